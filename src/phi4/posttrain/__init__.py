"""Post-training: SFT and DPO losses, and Pivotal Token Search that makes DPO pairs."""
