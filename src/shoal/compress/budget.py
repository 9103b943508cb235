"""Budgets: the most accurate compressed model within a size and / or a latency budget.

``shoal compress CONFIG --checkpoint RUN --target-size-kb X --target-latency-ms Y``:

1. Candidates come in families, each ordered from least to most pruned:
   the unpruned model; unstructured magnitude pruning at each sparsity (when a
   size budget is set: zeros shrink the artefact, not the latency); channel
   pruning at each ratio (when a latency budget is set: only removed channels
   run faster); channel pruning then magnitude pruning (both budgets; ordered
   by channel ratio first, then sparsity, so it is "least pruned first" only
   within one channel ratio, and point 3's early stop may pass over a plan
   with fewer channels removed but more zeros).
2. Each prune plan is one :func:`shoal.compress.compress` run (fine-tuned
   when ``finetune_steps`` > 0) measured twice: as the sparse artefact with
   fp32 values run by fp32 ONNX, and as static int8 ONNX (size: its file).
   Where the fp32-valued artefact misses only the size budget, the same
   model is stored again with int8 values in the artefact (a fine-tuned plan
   is not fine-tuned twice: its fine-tuning run's checkpoint is re-encoded).
3. A family stops at its first plan with a candidate within the budgets:
   pruning more costs accuracy (Han et al. 2015; Zhu & Gupta 2017), so the
   rest of the family would not be more accurate. When the unpruned model
   fits, nothing more is tried. Zeros shrink only the sparse artefact, which
   runs as dense fp32 ONNX, no faster (and static int8 ONNX stores them
   densely), so a magnitude plan is skipped when the same plan without it
   (the unpruned model, or the channel pruning alone) missed the latency
   budget in fp32 already.
4. The winner is the most accurate candidate within every budget (ties: the
   smaller, then the faster). None within: :class:`BudgetError`, naming the
   budget and the closest candidate (the smallest worst ratio of measured
   over budget). Either way ``OUT/budget.json`` lists every candidate tried.

Latency is ONNX Runtime's median at batch 32; size is the bytes that ship.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from shoal.compress.base import CompressError
from shoal.compress.run import compress

BUDGET = "budget.json"
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
CHANNEL_RATIOS = (0.25, 0.5, 0.75)


class Candidate(BaseModel):
    label: str  # prune-90/int8-values, channels-50/int8-static, ...
    spec: str  # every step that made it, as shoal compress reports it
    size_bytes: int
    latency_ms_batch32: float
    accuracy: float
    within: bool
    file: str  # what ships: the sparse artefact or the ONNX file


class BudgetReport(BaseModel):
    out: str
    target_size_kb: float | None
    target_latency_ms: float | None
    finetune_steps: int
    candidates: list[Candidate]
    winner: Candidate | None


class BudgetError(CompressError):
    """No candidate meets the budget; ``report`` holds every candidate tried."""

    def __init__(self, message: str, report: BudgetReport) -> None:
        super().__init__(message)
        self.report = report


def families(*, size: bool, latency: bool, sparsities=SPARSITIES, channel_ratios=CHANNEL_RATIOS) -> list[list[list[str]]]:
    """Prune plans (lists of prune specs) per family, least pruned first."""
    fams = [[[]]]
    if size:
        fams.append([[f"magnitude:sparsity={s}"] for s in sparsities])
    if latency:
        fams.append([[f"channels:ratio={r}"] for r in channel_ratios])
    if size and latency:
        fams.append([[f"channels:ratio={r}", f"magnitude:sparsity={s}"] for r in channel_ratios for s in sparsities])
    return fams


def plan_label(plan: list[str]) -> str:
    if not plan:
        return "unpruned"
    short = {"magnitude": "prune", "channels": "channels"}
    return "+".join(f"{short[s.split(':')[0]]}-{float(s.split('=')[1]) * 100:g}" for s in plan)


def within(size_bytes: float, latency_ms: float, target_size_kb: float | None, target_latency_ms: float | None) -> bool:
    return ((target_size_kb is None or size_bytes <= target_size_kb * 1000)
            and (target_latency_ms is None or latency_ms <= target_latency_ms))


def overshoot(c: Candidate, target_size_kb: float | None, target_latency_ms: float | None) -> float:
    """The worst ratio of measured over budget (<= 1: within)."""
    ratios = [c.size_bytes / (target_size_kb * 1000)] if target_size_kb is not None else []
    ratios += [c.latency_ms_batch32 / target_latency_ms] if target_latency_ms is not None else []
    return max(ratios)


def pick(candidates: list[Candidate]) -> Candidate | None:
    """The most accurate candidate within the budgets; ties: smaller, then faster."""
    fits = [c for c in candidates if c.within]
    return min(fits, key=lambda c: (-c.accuracy, c.size_bytes, c.latency_ms_batch32)) if fits else None


def describe(c: Candidate) -> str:
    return f"{c.label}: {c.size_bytes / 1000:,.1f} KB, {c.latency_ms_batch32:.3f} ms at batch 32, accuracy {c.accuracy:.4f}"


def search(config: Any, *, checkpoint: str | Path, target_size_kb: float | None = None,
           target_latency_ms: float | None = None, out: str | Path = "runs/compress-budget",
           sparsities: tuple[float, ...] = SPARSITIES, channel_ratios: tuple[float, ...] = CHANNEL_RATIOS,
           finetune_steps: int = 0, overrides: list[str] | tuple[str, ...] = (), threads: int = 1,
           repeats: int = 50, log: Callable[[str], None] | None = None) -> BudgetReport:
    """Search pruning and quantisation for the most accurate model within the budgets (module docstring).

    Returns the :class:`BudgetReport` (``report.winner``); raises
    :class:`BudgetError` when no candidate is within the budgets, and
    :class:`CompressError` / :class:`shoal.ConfigError` for bad input.
    """
    if target_size_kb is None and target_latency_ms is None:
        raise CompressError("give a budget: --target-size-kb and / or --target-latency-ms")
    for name, value in (("--target-size-kb", target_size_kb), ("--target-latency-ms", target_latency_ms)):
        if value is not None and not value > 0:
            raise CompressError(f"{name} {value}: must be > 0")
    say = log or (lambda line: None)
    out = Path(out)
    candidates: list[Candidate] = []
    too_slow: set[str] = set()  # plans whose fp32 ONNX missed the latency budget
    reports: dict[str, Any] = {}  # the last compress report per artefact values

    def measure(plan: list[str], values: str, quantize: list[str], tuned: Any = None) -> list[Candidate]:
        """``tuned``: the fp32 run's report, when it fine-tuned: its model is stored again, not trained again."""
        label = plan_label(plan)
        run_dir = out / "candidates" / (label + ("-int8-values" if values == "int8" else ""))
        if tuned is not None:
            source = Path(tuned.finetune["run"])  # shoal train's run: the pruned model's config and weights
            report = compress(source / "config.yaml", checkpoint=source, quantize=quantize,
                              artefact=f"sparse:values={values}", out=run_dir, threads=threads, repeats=repeats)
            prefix = tuned.rows[1].spec.rsplit(" | ", 1)[0] + " | "  # the plan that made it, fine-tuned
        else:
            report = compress(config, checkpoint=checkpoint, prune=plan, quantize=quantize,
                              artefact=f"sparse:values={values}", out=run_dir, overrides=overrides, threads=threads,
                              repeats=repeats, finetune_steps=finetune_steps if plan else 0)
            prefix = ""
        reports[values] = report
        found = []
        for row in report.rows[1:]:
            name = f"{label}/{values}-values" if row.kind == "compressed" else f"{label}/{row.name}"
            size = row.artefact_bytes
            c = Candidate(label=name, spec=prefix + row.spec, size_bytes=size, latency_ms_batch32=row.latency_ms_batch32,
                          accuracy=row.accuracy, file=str(run_dir / row.artefact),
                          within=within(size, row.latency_ms_batch32, target_size_kb, target_latency_ms))
            say(("  within  " if c.within else "  outside ") + describe(c))
            found.append(c)
        return found

    for family in families(size=target_size_kb is not None, latency=target_latency_ms is not None,
                           sparsities=sparsities, channel_ratios=channel_ratios):
        for plan in family:
            dense = plan_label([spec for spec in plan if not spec.startswith("magnitude")])
            if dense in too_slow:
                say(f"skipping {plan_label(plan)}: {dense} misses the latency budget, and zeros run no faster")
                continue
            say(f"trying {plan_label(plan)}" + (f" ({', '.join(plan)})" if plan else ""))
            found = measure(plan, "fp32", ["int8-static"])
            if not within(0, found[0].latency_ms_batch32, None, target_latency_ms):
                too_slow.add(plan_label(plan))  # its zeros would ship at this fp32 latency
            dense = found[0]
            if (not dense.within and target_size_kb is not None and within(
                    0, dense.latency_ms_batch32, None, target_latency_ms)):
                first = reports["fp32"]  # only the size missed: int8 values are 4x smaller
                found += measure(plan, "int8", [], tuned=first if first.finetune else None)
            candidates += found
            if any(c.within for c in found):
                break
        if family == [[]] and any(c.within for c in candidates):
            break  # the unpruned model fits: pruning would only cost accuracy
    winner = pick(candidates)
    report = BudgetReport(out=str(out), target_size_kb=target_size_kb, target_latency_ms=target_latency_ms,
                          finetune_steps=finetune_steps, candidates=candidates, winner=winner)
    from shoal.metrics.summary import write_json_atomic

    write_json_atomic(out / BUDGET, report.model_dump())
    if winner is None:
        budget = " and ".join(
            ([f"--target-size-kb {target_size_kb:g}"] if target_size_kb is not None else [])
            + ([f"--target-latency-ms {target_latency_ms:g} (batch 32)"] if target_latency_ms is not None else []))
        closest = min(candidates, key=lambda c: overshoot(c, target_size_kb, target_latency_ms))
        raise BudgetError(f"no candidate meets {budget}: {len(candidates)} tried, the closest is "
                          f"{describe(closest)}; every candidate is in {out / BUDGET}", report)
    say(f"winner: {describe(winner)}")
    return report
