"""Direct Preference Optimization: the loss, and its forward steps over Megatron-Core's schedules.

For a pair (chosen c, rejected r) with summed response log-probabilities under the policy (pi)
and the frozen reference (ref):
    reward_c = beta (pi_c - ref_c),  reward_r = beta (pi_r - ref_r)
    loss     = -log sigmoid(reward_c - reward_r)
A micro-batch holds k pairs as rows [chosen_1..k, rejected_1..k] (phi4.data.preference). The
reference's log-probabilities are computed first, with the reference model in the same layout
and forward only, and ride along in the micro-batch (`ref_logps`) into the policy's step.
Megatron-Core's per-token loss convention (loss sum, count) carries pairs here: the count is the
number of pairs, so gradients and the reported loss are means per pair over the global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from phi4.checkpoint.weights import load_model_weights
from phi4.errors import ConfigError
from phi4.model.build import build_phi4_model
from phi4.model.pipeline_schedule import run_schedule
from phi4.settings import Dpo, typed
from phi4.train.objective import Objective, register
from phi4.train.parts import RunSpec
from phi4.train.update import Gate, StepResult, forward_backward_update

# What the DPO step reports, summed over pairs (then divided by the pair count).
REPORT = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
          "rejected_logp")


def dpo_terms(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float) -> dict:
    """Per-pair loss, rewards, margin and accuracy (1 where the chosen reward is higher)."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    return dict(loss=-F.logsigmoid(margin), reward_accuracy=(margin > 0).float(), reward_margin=margin,
                chosen_reward=chosen_reward, rejected_reward=rejected_reward, chosen_logp=pi_chosen,
                rejected_logp=pi_rejected)


def sequence_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's masked (response) tokens, from GPTModel's per-token
    cross entropy (which is -log p of each label, reduced across tensor-parallel ranks)."""
    return -(per_token_loss.float() * loss_mask.float()).sum(dim=1)


def _reference_loss(loss_mask, per_token_loss):
    logps = sequence_logps(per_token_loss, loss_mask).detach()
    return torch.zeros((), device=logps.device), torch.ones((), dtype=torch.int, device=logps.device), {"logps": logps}


def _model_call(batch, model):
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def _reference_step(data_iterator, model):
    batch = next(data_iterator)
    return _model_call(batch, model), partial(_reference_loss, batch["loss_mask"])


@torch.no_grad()
def attach_reference_logps(reference_chunks: list, micro_batches: list[dict]) -> list[dict]:
    """Each micro-batch with `ref_logps` [2k] from the reference model (on the last pipeline
    stage, where the DPO loss is computed; elsewhere the batch is returned unchanged)."""
    outputs = run_schedule(_reference_step, reference_chunks, micro_batches, forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return micro_batches
    return [{**batch, "ref_logps": out["logps"]} for batch, out in zip(micro_batches, outputs)]


def _dpo_loss(batch, beta, per_token_loss):
    logps = sequence_logps(per_token_loss, batch["loss_mask"])
    k = logps.shape[0] // 2
    ref = batch["ref_logps"].to(logps.device)
    terms = dpo_terms(logps[:k], logps[k:], ref[:k], ref[k:], beta)
    pairs = torch.tensor(float(k), device=logps.device)
    report = torch.stack([terms[name].detach().float().sum() for name in REPORT] + [pairs])
    return terms["loss"].sum(), torch.tensor(k, dtype=torch.int, device=logps.device), {"dpo": report}


def dpo_forward_step(beta: float):
    """A forward step for Megatron-Core's schedules computing the DPO loss of each micro-batch."""

    def step(data_iterator, model):
        batch = next(data_iterator)
        return _model_call(batch, model), partial(_dpo_loss, batch, beta)

    return step


def reduce_report(reports: list[dict]) -> Optional[dict]:
    """{name: mean per pair} over the micro-batches and data-parallel ranks (last stage; else None)."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([r["dpo"] for r in reports]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    pairs = total[-1].item()
    return {name: total[i].item() / pairs for i, name in enumerate(REPORT)}


def freeze(reference_chunks: list) -> list:
    for chunk in reference_chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return reference_chunks


@torch.no_grad()
def evaluate_preferences(reference_chunks: list, beta: float, chunks: list, micro_batches: list[dict]) -> Optional[dict]:
    """The DPO figures of the policy `chunks` on the micro-batches, without a backward pass."""
    micro_batches = attach_reference_logps(reference_chunks, micro_batches)
    return reduce_report(run_schedule(dpo_forward_step(beta), chunks, micro_batches, forward_only=True))


@register("dpo")
class DirectPreference(Objective):
    """The DPO objective: the frozen reference, built in the policy's layout from `dpo.reference`
    (default: the checkpoint the policy starts from), scores each micro-batch first, then the
    policy steps on the DPO loss."""

    formats = ("preference",)
    rows_per_sample = 2  # a pair: its chosen and its rejected row

    def check(self, spec: RunSpec) -> None:
        if self.cfg.get("dpo") is None:
            raise ConfigError("train.objective=dpo needs the dpo settings (beta, reference): use stage=dpo")
        self.settings: Dpo = typed(self.cfg, "dpo")
        topology = spec.settings.topology
        if topology.cp > 1:  # a pair's log-probability is a sum over the whole sequence
            raise ConfigError(f"train.objective=dpo needs topology.cp=1 (got {topology.cp}): each "
                              "context-parallel rank would score only its own chunks of every response; "
                              "valid: a layout with topology.cp=1, e.g. topology=h100_1920")
        self.reference_path = self.settings.reference or spec.settings.checkpoint.load
        if not self.reference_path:
            raise ConfigError("train.objective=dpo needs a reference model: set dpo.reference or checkpoint.load "
                              "(the SFT checkpoint)")

    def start_points(self) -> list[tuple[str, str]]:
        return [("dpo.reference" if self.settings.reference else "checkpoint.load", self.reference_path)]

    def build(self, spec: RunSpec, transformer_config) -> None:
        run = spec.settings
        reference = build_phi4_model(run.model, run.topology, run.precision, config=transformer_config)
        load_model_weights(reference, self.reference_path)
        self.reference, self.beta = freeze(reference), self.settings.beta

    def update(self, model_chunks: list, optimizer, micro_batches: list[dict],
               gate: Optional[Gate] = None) -> StepResult:
        micro_batches = attach_reference_logps(self.reference, micro_batches)
        return forward_backward_update(model_chunks, optimizer, micro_batches, dpo_forward_step(self.beta),
                                       reduce_report, gate)

    def evaluate(self, model_chunks: list, micro_batches: list[dict]) -> Optional[dict]:
        return evaluate_preferences(self.reference, self.beta, model_chunks, micro_batches)

    def describe(self, r: Mapping[str, float]) -> str:
        return (f"reward acc {r['reward_accuracy']:.3f} | margin {r['reward_margin']:+.4f} | "
                f"logp chosen {r['chosen_logp']:.3f} rejected {r['rejected_logp']:.3f}")

    def throughput(self, tokens_per_step: int, flops_per_token: float) -> tuple[int, float]:
        # a pair is two rows, and the reference's forward adds a third of a step's FLOPs
        return 2 * tokens_per_step, flops_per_token * 4 / 3
