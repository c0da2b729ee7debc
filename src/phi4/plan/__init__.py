"""phi4-plan: memory, time and cost of a layout before anything is submitted."""
