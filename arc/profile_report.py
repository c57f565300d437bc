"""`arc profile`'s outputs: the table (rich when it is installed, plain text otherwise), the
per-layer breakdown, and the chart (matplotlib, the `plot` extra): tok/s per prefix as a
waterfall of what each pass added, beside the weight bytes read per token and peak memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = (
    "prefix", "pass ms", "nodes", "build s", "tok/s", "x none", "ms/tok", "prefill ms",
    "tok/fwd", "KV B/tok", "W MB/tok", "RSS MB", "agree", "ppl %",
)  # fmt: skip


def rows(result: dict[str, Any]) -> list[list[str]]:
    base = result["prefixes"][0]["decode"]["tok_s"]
    out = []
    for p in result["prefixes"]:
        c, d, m, q = p["compile"], p["decode"], p["memory"], p["quality"]
        ppl = "-" if q["ppl"] is None else f"{q['ppl']['delta_pct']:+.2f}"
        out.append(
            [
                ("+ " + p["added"]) if p["added"] else "(no passes)",
                "-" if c["pass_ms"] is None else f"{c['pass_ms']:.1f}",
                "-" if c["nodes_in"] is None else f"{c['nodes_in']}->{c['nodes_out']}",
                f"{c['build_s']:.0f}" + (" (cached)" if p["cached"] else ""),
                f"{d['tok_s']:.1f}",
                f"{d['tok_s'] / base:.2f}x",
                f"{d['ms_per_token']:.2f}",
                f"{d['prefill_ms']:.0f}",
                f"{d['tokens_per_forward']:.2f}",
                f"{m['kv_bytes_per_token']:,}",
                f"{m['weight_bytes_per_token'] / 1e6:.1f}",
                f"{m['peak_rss_bytes'] / 1e6:.0f}",
                f"{q['greedy_agreement']:.3f}",
                "lossless" if q["lossless"] else ppl,
            ]
        )
    return out


def header(result: dict[str, Any]) -> str:
    s, mc = result["settings"], result["machine"]
    return (
        f"{result['model']} on {result['target']}/{result['device']}: {result['pipeline'] or '-'}\n"
        f"{mc['cpu']}, {mc['cores']} cores, torch {mc['torch']}; {s['prompts']} prompts x "
        f"{s['new_tokens']} new tokens, median of {s['rounds']} rounds, each prefix in its own "
        "process"
    )


def print_table(result: dict[str, Any], *, fancy: bool) -> None:
    body = rows(result)
    if fancy:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            fancy = False
    if fancy:
        t = Table(title=header(result), title_justify="left")
        for i, col in enumerate(COLUMNS):
            t.add_column(col, justify="left" if i == 0 else "right")
        for r in body:
            t.add_row(*r)
        Console().print(t)
    else:
        print(header(result))
        print(markdown(body))
    layers = result.get("per_layer")
    if layers:
        print(f"\nper layer ({layers['method']}; {layers['step_ms']:.2f} ms per step):")
        total = layers["step_ms"] or 1.0
        for op, ms in layers["by_op"].items():
            print(f"  {op:<12} {ms:8.3f} ms  {100 * ms / total:5.1f} %")
        top = sorted(layers["by_layer"].items(), key=lambda x: -x[1])[:6]
        print("  heaviest: " + ", ".join(f"{k} {v:.2f} ms" for k, v in top))


def markdown(body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Waterfall of tok/s (each bar starts where the previous prefix ended) and, beside it,
    weight MB read per decoded token and peak RSS per prefix. Written atomically."""
    from arc.errors import MissingExtraError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError("matplotlib (for --plot)", "plot") from None
    pre = result["prefixes"]
    labels = [("+" + p["added"].split("{")[0]) if p["added"] else "none" for p in pre]
    tps = [p["decode"]["tok_s"] for p in pre]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    prev = 0.0
    for i, v in enumerate(tps):
        lo, hi = (0.0, v) if i == 0 else (min(prev, v), max(prev, v))
        color = "tab:gray" if i == 0 else ("tab:green" if v >= prev else "tab:red")
        a.bar(i, hi - lo, bottom=lo, color=color)
        delta = "" if i == 0 else f" ({v / prev:.2f}x)"
        a.text(i, hi, f"{v:.0f}{delta}", ha="center", va="bottom", fontsize=8)
        prev = v
    a.set_xticks(range(len(pre)), labels, rotation=20)
    a.set_ylabel("decode tok/s")
    a.set_title("what each pass added (tok/s)")
    x = range(len(pre))
    wt = [p["memory"]["weight_bytes_per_token"] / 1e6 for p in pre]
    rss = [p["memory"]["peak_rss_bytes"] / 1e6 for p in pre]
    b.bar([i - 0.2 for i in x], wt, width=0.4, label="weight MB read / token")
    b.bar([i + 0.2 for i in x], rss, width=0.4, label="peak RSS MB")
    b.set_xticks(list(x), labels, rotation=20)
    b.set_title("memory")
    b.legend(fontsize=8)
    fig.suptitle(header(result).splitlines()[0], fontsize=9)
    fig.tight_layout()
    import io

    from arc.bench import write_atomic

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_atomic(Path(path), buf.getvalue())
