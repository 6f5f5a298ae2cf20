"""A rollout's timeline as a report: one row per analysis interval with what the controller
saw (phase, canary weight, failed checks, the canary's success rate and p99) and what the
users saw in that interval (requests, failures, success rate, p99), as JSON; and as a PNG
when matplotlib is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from fixtures.flagger import Rollout
from fixtures.load import Record, percentile


def rows(rollout: Rollout, records: Sequence[Record]) -> list[dict]:
    """Timeline points joined with the users' requests sent since the previous point."""
    tenant = rollout.spec.namespace
    mine = sorted((r for r in records if r.tenant == tenant), key=lambda r: r.t)
    out, previous = [], -math.inf
    for p in rollout.timeline:
        now = rollout.started_at + p.t
        window = [r for r in mine if previous <= r.t < now]
        previous = now
        ok = sum(1 for r in window if r.ok)
        out.append({**p.as_dict(), "users": {
            "requests": len(window), "failed": len(window) - ok,
            "success_rate": 100 * ok / len(window) if window else None,
            "p99_ms": percentile([r.latency_ms for r in window], 99) if window else None}})
    return out


def write(stem: Path, rollout: Rollout, records: Sequence[Record]) -> list[Path]:
    """``stem``.json always; ``stem``.png if matplotlib can be imported."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"canary": rollout.spec.ref, "version": rollout.version, "status": str(rollout.status),
            "interval_s": rollout.spec.interval_s, "timeline": rows(rollout, records)}
    written = [stem.with_suffix(".json")]
    written[0].write_text(json.dumps(data, indent=1, default=str))
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    written.append(_png(stem.with_suffix(".png"), rollout, data))
    return written


def _png(path: Path, rollout: Rollout, data: dict) -> Path:
    import matplotlib.pyplot as plt

    tl = data["timeline"]
    t = [r["t"] for r in tl]
    fig, (ax_w, ax_sr, ax_p) = plt.subplots(3, 1, sharex=True, figsize=(9, 7.5), constrained_layout=True)
    fig.suptitle(f"{data['canary']} -> {data['version']}: {rollout.status.phase}", fontsize=11)

    ax_w.step(t, [r["weight"] for r in tl], where="post", label="canary weight (%)", color="tab:blue")
    ax_w.set_ylabel("weight %")
    ax_w.set_ylim(-5, 105)
    ax_fc = ax_w.twinx()
    ax_fc.step(t, [r["failed_checks"] for r in tl], where="post", color="tab:red", label="failed checks")
    ax_fc.axhline(rollout.spec.threshold, color="tab:red", linestyle=":", linewidth=1, label="threshold")
    ax_fc.set_ylabel("failed checks")
    ax_fc.set_ylim(-0.5, rollout.spec.threshold + 1.5)
    last = None
    for r in tl:
        if r["phase"] != last:
            ax_w.axvline(r["t"], color="grey", linewidth=0.5)
            ax_w.text(r["t"] + 0.3, 102, r["phase"], rotation=90, va="top", fontsize=7, color="dimgrey")
            last = r["phase"]
    ax_w.legend(handles=ax_w.get_lines()[:1] + ax_fc.get_lines()[:2], loc="center left", fontsize=8)

    def series(key: str, sub: str | None = None) -> list[float]:
        return [(r[sub][key] if sub else r[key]) if (r[sub][key] if sub else r[key]) is not None else math.nan
                for r in tl]

    ax_sr.plot(t, series("success_rate"), marker="o", label="canary (Prometheus)")
    ax_sr.plot(t, series("success_rate", "users"), marker="x", label="users (locust)")
    ax_p.plot(t, series("p99_ms"), marker="o", label="canary (Prometheus)")
    ax_p.plot(t, series("p99_ms", "users"), marker="x", label="users (locust)")
    for m in rollout.spec.metrics:
        if m.min is not None:
            ax_sr.axhline(m.min, color="tab:red", linestyle=":", linewidth=1, label=f"{m.name} min")
        if m.max is not None:
            ax_p.axhline(m.max, color="tab:red", linestyle=":", linewidth=1, label=f"{m.name} max")
    ax_sr.set_ylabel("success rate %")
    ax_p.set_ylabel("p99 ms")
    ax_p.set_xlabel(f"seconds since the rollout started (analysis interval {rollout.spec.interval})")
    for ax in (ax_sr, ax_p):
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
