"""Runs of a Booster on the 2-layer test model, checkpointed the way the recipe checkpoints them
(recipe_mixin._save_resume: the new ledger segments, then the state and the manifest listing them)."""

from pathlib import Path

from benchmarks.round_counts import perturb_adapters, tiny_booster
from torchtune_xgb.run import checkpointing, ledger_segments


class Run:
    """A booster and its checkpoints, saved the way the recipe saves them."""

    def __init__(self, out: Path, base: str = "bf16"):
        self.out, self.booster, self.entries = out, tiny_booster(base), []

    def merge(self, rounds: int = 1) -> None:
        for _ in range(rounds):
            perturb_adapters(self.booster, seed=len(self.booster.reports))
            self.booster.step += 1
            self.booster.end_round()

    def save(self) -> int:
        """Save a checkpoint; return the bytes of the files it created or changed."""
        root = checkpointing.resume_root(str(self.out))
        before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}
        payloads = self.booster.segment_payloads(len(self.entries))
        self.entries = self.entries + ledger_segments.write_segments(root, payloads)
        checkpointing.save_resume_state(str(self.out), self.booster.step, {"booster": self.booster.state_dict()},
                                        segments=self.entries)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns)


def resumed(out: Path, base: str = "bf16"):
    """A fresh booster resumed from ``out``'s newest intact checkpoint."""
    chosen = checkpointing.select_resume_checkpoint(str(out))
    state = checkpointing.load_resume_state(chosen)
    booster = tiny_booster(base)
    booster.load_state_dict(state["booster"], checkpointing.load_resume_segments(chosen))
    return booster, chosen


def segment_files(out: Path):
    return sorted(p.name for p in (checkpointing.resume_root(str(out)) / "segments").iterdir())
