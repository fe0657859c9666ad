"""The paper's claims as verdicts computed from measured numbers; pure functions, no training and no files.

* C1 with text, reconstruction is better at every token count (``both`` beats ``none`` at every N);
* C2 the gain from text is largest with the fewest tokens (relative gain largest at the smallest N);
* C3 ``both > encoder > decoder > none`` (strictly, at each N);
* C4 a generator over the text tokenizer's tokens gives better samples than one over the no-text tokenizer's
  (the mean sample FD over sampling seeds; a gap within the spread between seeds is "inconclusive").

Every verdict is ``{"holds": True | False | None, "verdict": str, "detail": str}``: "holds", "does not hold",
"undecided" (``None``: the noise of a comparison it rests on straddles zero — a paired bootstrap interval over
the evaluation images, or training seeds that disagree) or "not testable" (``None``: the modes and token counts
given do not allow it). Without noise estimates every comparison is decided by the point values. Everything in
``detail`` is computed from the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...eval.bootstrap import LEVEL, percentile_interval
from ...eval.compare import higher_is_better, is_better, relative_gain

CLAIMS = {
    "C1": "with text, reconstruction is better at every token count",
    "C2": "the gain from text is largest with the fewest tokens",
    "C3": "both > encoder > decoder > none",
    "C4": "a generator over the text tokenizer's tokens beats one over the no-text tokenizer's",
}
ORDER_C3 = ("both", "encoder", "decoder", "none")  # the paper's ablation order, best first


def primary_metrics(metrics: Sequence[str]) -> list[str]:
    """The headline metrics: rFID (when the real Inception ran), the FD-opennsfw family, the KIDs beside them,
    and PSNR."""
    fd = [m for m in metrics if m == "rFID" or m.startswith("FD-opennsfw")]
    kid = [m for m in metrics if m == "rKID" or m.startswith("KID-opennsfw")]
    return fd + kid + [m for m in metrics if m == "PSNR"]


def token_list(ns) -> str:
    """Token counts as text: ``1, 4, 16``."""
    return ", ".join(str(n) for n in ns)


Outcome = dict[str, Any]


def compare(a: float, b: float, higher: bool, reps_a: np.ndarray | None = None, reps_b: np.ndarray | None = None,
            seeds: Sequence[float] | None = None, level: float = LEVEL) -> Outcome:
    """Is ``a`` better than ``b``? ``better``, ``worse`` or, with noise estimates, ``undecided``.

    ``reps_a``/``reps_b``: paired bootstrap replicates of the two values (the same resamplings of the same
    images); the difference's interval is their percentile interval, shifted to centre on the measured
    difference. It decides only when it lies on one side of zero. ``seeds``: the difference ``a - b`` measured
    again with other training seeds; when the seeds disagree in sign, the answer is undecided whatever the
    interval. Without either, the point values decide (the firm answer of a single measurement).
    """
    diff = a - b
    out: Outcome = {"diff": diff, "interval": None}
    if reps_a is not None and reps_b is not None:
        d = np.asarray(reps_a, np.float64) - np.asarray(reps_b, np.float64)
        lo, hi = percentile_interval(d, level)
        shift = diff - float(np.nanmean(d))
        lo, hi = lo + shift, hi + shift
        out["interval"] = (lo, hi)
        good, bad = (lo > 0, hi < 0) if higher else (hi < 0, lo > 0)
        out["outcome"] = "better" if good else "worse" if bad else "undecided"
    else:
        out["outcome"] = "better" if is_better(a, b, higher) else "worse"
    if seeds:
        out["seed_diffs"] = [diff, *seeds]
        if len({float(np.sign(x)) for x in out["seed_diffs"]}) > 1:
            out["outcome"] = "undecided"
    return out


def describe(o: Outcome, unit: str = "") -> str:
    """``+0.03 [-0.01, +0.07]`` (interval when there is one; per-seed differences when there are several)."""
    text = f"{o['diff']:+.3g}{unit}"
    if o.get("interval"):
        lo, hi = o["interval"]
        text += f" [{lo:+.3g}, {hi:+.3g}]"
    if o.get("seed_diffs"):
        text += " (per seed " + "/".join(f"{x:+.3g}" for x in o["seed_diffs"]) + ")"
    return text


def _overall(outcomes: Sequence[str]) -> tuple[bool | None, str]:
    """All better: holds; any worse: does not hold; else undecided."""
    if all(o == "better" for o in outcomes):
        return True, "holds"
    if any(o == "worse" for o in outcomes):
        return False, "does not hold"
    return None, "undecided"


def judge(values: dict[str, dict[int, float]], higher: bool,
          replicates: dict[str, dict[int, np.ndarray]] | None = None,
          seeds: dict[str, dict[int, Sequence[float]]] | None = None, level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """Verdicts on C1-C3 for one metric, from ``values[mode][N]``, and the relative gain of text at each N.

    ``replicates[mode][N]``: paired bootstrap replicates of each value (:mod:`textok.eval.bootstrap`);
    ``seeds[mode][N]``: the value measured with other training seeds. With either, a comparison whose noise
    straddles zero is "undecided", and so is a claim that rests on one (see :func:`compare`).
    """
    reps = replicates or {}
    seed_vals = seeds or {}

    def pair(a: str, b: str, n: int) -> Outcome:
        ra, rb = reps.get(a, {}).get(n), reps.get(b, {}).get(n)
        sa, sb = seed_vals.get(a, {}).get(n), seed_vals.get(b, {}).get(n)
        other = [x - y for x, y in zip(sa, sb)] if sa and sb else None
        return compare(values[a][n], values[b][n], higher, ra, rb, other, level)

    out: dict[str, dict[str, Any]] = {}
    both, none = values.get("both", {}), values.get("none", {})
    ns = sorted(set(both) & set(none))
    # C1: both beats none at every N
    if not ns:
        out["C1"] = _untestable("needs the modes both and none")
    else:
        c1 = {n: pair("both", "none", n) for n in ns}
        holds, verdict = _overall([c1[n]["outcome"] for n in ns])
        by = {k: [n for n in ns if c1[n]["outcome"] == k] for k in ("better", "worse", "undecided")}
        if holds:
            detail = f"text beats no text at every N ({token_list(ns)})"
        elif not by["better"] and not by["undecided"]:
            detail = f"text beats no text at no N ({token_list(ns)})"
        else:
            detail = "; ".join(f"{label} at N={token_list(by[k])}" for k, label in
                               (("better", "text beats no text"), ("worse", "not"), ("undecided", "undecided"))
                               if by[k])
        detail += " — text − no text: " + ", ".join(f"N={n}: {describe(c1[n])}" for n in ns)
        out["C1"] = {"holds": holds, "verdict": verdict, "detail": detail,
                     "comparisons": {str(n): c1[n] for n in ns}}
    # C2: the relative gain is largest at the smallest N
    gains = {n: relative_gain(both[n], none[n], higher) for n in ns}
    if len(ns) < 2:
        out["C2"] = _untestable("needs both and none at two or more token counts")
    else:
        out["C2"] = _judge_c2(ns, gains, pair, reps, values, higher, level)
    # C3: both > encoder > decoder > none, strictly, at each N
    n3 = sorted(set.intersection(*(set(values.get(m, {})) for m in ORDER_C3)))
    if not n3:
        out["C3"] = _untestable("needs the modes both, encoder, decoder and none")
    else:
        at: dict[int, str] = {}
        orders = {}
        for n in n3:
            links = [pair(a, b, n)["outcome"] for a, b in zip(ORDER_C3, ORDER_C3[1:])]
            at[n] = _overall(links)[1]
            if at[n] != "holds":
                orders[n] = " > ".join(sorted(ORDER_C3, key=lambda m: values[m][n], reverse=higher))
        holds, verdict = _overall(["better" if at[n] == "holds" else "worse" if at[n] == "does not hold"
                                   else "undecided" for n in n3])
        ok = [n for n in n3 if at[n] == "holds"]
        if holds:
            detail = f"holds at every N ({token_list(n3)})"
        else:
            seen = "; ".join(f"N={n}: {o} ({at[n]})" for n, o in orders.items())
            detail = (f"holds at N={token_list(ok)}; not at N={token_list([n for n in n3 if n not in ok])} ({seen})"
                      if ok else f"holds at no N (measured order {seen})")
        out["C3"] = {"holds": holds, "verdict": verdict, "detail": detail, "holds_at": ok}
    out["gains"] = {str(n): gains[n] for n in ns}
    return out


def _untestable(why: str) -> dict[str, Any]:
    return {"holds": None, "verdict": "not testable", "detail": why}


def _judge_c2(ns: list[int], gains: dict[int, float], pair, reps, values, higher: bool, level: float) -> dict[str, Any]:
    """C2 from the relative gains; with replicates, each gain difference has its interval too."""
    smallest, rest = ns[0], ns[1:]
    g0 = gains[smallest]
    listing = ", ".join(f"N={n}: {gains[n] * 100:+.1f}%" for n in ns)
    helps = pair("both", "none", smallest)["outcome"]
    have = all(reps.get(m, {}).get(n) is not None for m in ("both", "none") for n in ns)
    if have:
        g = {n: _gain_reps(reps["both"][n], reps["none"][n], higher) for n in ns}
        links = [compare(g0, gains[n], True, g[smallest], g[n], None, level)["outcome"] for n in rest]
    else:
        links = ["better" if math.isfinite(g0) and math.isfinite(gains[n]) and g0 > gains[n] else "worse"
                 for n in rest]
    holds, verdict = _overall([helps, *links])
    best_other = max(rest, key=lambda n: gains[n] if math.isfinite(gains[n]) else -math.inf)
    if helps == "worse":  # a "largest" loss is no gain
        detail = f"text does not help at N={smallest} ({listing})"
    elif holds:
        detail = f"largest gain at N={smallest} ({listing})"
    elif verdict == "undecided":
        detail = f"the gain at N={smallest} is not decidedly the largest or not decidedly a gain ({listing})"
    else:
        detail = f"the gain at N={smallest} is not the largest (N={best_other} has more; {listing})"
    return {"holds": holds, "verdict": verdict, "detail": detail}


def _gain_reps(text: np.ndarray, base: np.ndarray, higher: bool) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = (text - base) if higher else (base - text)
        return diff / np.abs(base)


def verdicts(cells: dict[str, dict[int, dict[str, float]]], metrics: Sequence[str],
             replicates: dict[str, dict[str, dict[int, np.ndarray]]] | None = None,
             seeds: dict[str, dict[int, dict[str, Sequence[float]]]] | None = None) -> dict[str, dict[str, Any]]:
    """Per metric: :func:`judge` over ``cells[mode][N][metric]`` (metrics missing in a cell are left out), with
    ``replicates[metric][mode][N]`` (bootstrap) and ``seeds[mode][N][metric]`` (other training seeds) when given."""
    result = {}
    for metric in metrics:
        values = {mode: {n: float(m[metric]) for n, m in per_n.items() if metric in m} for mode, per_n in cells.items()}
        per_seed = ({mode: {n: list(v[metric]) for n, v in per_n.items() if metric in v}
                     for mode, per_n in seeds.items()} if seeds else None)
        result[metric] = judge(values, higher_is_better(metric), (replicates or {}).get(metric), per_seed)
    return result


def word(verdict: dict[str, Any] | bool | None) -> str:
    """A verdict in a word: holds, does not hold, undecided, not testable."""
    if isinstance(verdict, dict):
        return verdict.get("verdict") or word(verdict["holds"])
    return {True: "holds", False: "does not hold", None: "not testable"}[verdict]


def verdict_lines(claims: dict[str, dict[str, Any]], primary: Sequence[str], generation: str | None = None) -> list[str]:
    """One line per claim over the primary metrics, e.g. ``C1 (...): FD-opennsfw@64 holds (...); PSNR ...``."""
    lines = []
    for cid in ("C1", "C2", "C3"):
        parts = [f"{m} {word(claims[m][cid])} ({claims[m][cid]['detail']})" for m in primary if m in claims]
        lines.append(f"{cid} — {CLAIMS[cid]}: " + ("; ".join(parts) if parts else "no metric to judge"))
    lines.append(f"C4 — {CLAIMS['C4']}: " + (generation or "not run (pass --generation)"))
    return lines


def judge_generation(text: dict[str, Any], base: dict[str, Any], text_mode: str, n: int) -> dict[str, Any]:
    """C4's verdict from the two generator runs' per-seed sample FDs (lower is better)."""
    metric = text["metric"]
    ts, bs = text["sample_fd"], base["sample_fd"]
    tm, bm = statistics.fmean(ts), statistics.fmean(bs)
    spread = max(max(ts) - min(ts), max(bs) - min(bs))
    gain = (bm - tm) / abs(bm) if bm else float("nan")
    if len(ts) > 1 and abs(tm - bm) <= spread:
        holds = None
        verdict = "inconclusive"
    else:
        holds = tm < bm
        verdict = "holds" if holds else "does not hold"
    seeds = f"; per sampling seed {_join(ts)} vs {_join(bs)}" if len(ts) > 1 else ""
    detail = (f"{metric} of samples at N={n}: text ({text_mode}) {tm:.2f} vs no text {bm:.2f} "
              f"({gain * 100:+.1f}% for text){seeds}; the tokenizers' own reconstructions of the same images: "
              f"{text['recon_fd']:.2f} vs {base['recon_fd']:.2f}")
    if holds is None:
        detail += f"; the gap {abs(tm - bm):.2f} is within the spread between sampling seeds ({spread:.2f})"
    return {"metric": metric, "holds": holds, "verdict": verdict, "detail": detail, "relative_gain": gain}


def _join(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


__all__ = ["CLAIMS", "ORDER_C3", "compare", "describe", "judge", "judge_generation", "primary_metrics", "token_list",
           "verdict_lines", "verdicts", "word"]
