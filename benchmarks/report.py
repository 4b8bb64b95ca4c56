"""Writing the results: the terminal table, results.json, results.md and the speedup plot."""
import json
import math
import os

SIZE_ORDER = ("tiny", "medium", "large")
STYLES = {"forward": ":", "backward": "--", "forward+backward": "-", "step": "-"}  # plot: one colour per backend


def fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_num(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def fmt_mem(b):
    if b is None:
        return "-"
    if isinstance(b, dict):
        return "err"
    return f"{b / 2**20:.2f}" if abs(b) < 10 * 2**20 else f"{b / 2**20:.0f}"


def fmt_err(x):
    return "-" if x is None else ("nan" if x != x else f"{x:.1e}")


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 5 or i == len(widths) - 1 else str(c).rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


TIME_HEADER = ["op", "size", "mode", "dtype", "backend", "pyengine", "torch", "speedup", "GB/s", "%BW", "GFLOP/s",
               "peak MiB pe/torch", "note"]


def time_rows(results, note_width=None):
    out = []
    for r in results["timings"]:
        mem = ""
        if r.get("pyengine_peak_bytes") is not None or r.get("torch_peak_bytes") is not None:
            mem = f"{fmt_mem(r.get('pyengine_peak_bytes'))} / {fmt_mem(r.get('torch_peak_bytes'))}"
        share = r.get("pyengine_bw_share")
        out.append([r["op"], f"{r['size']} {r['shape']}", r["mode"], r["dtype"], r["backend"],
                    fmt_time(r["pyengine_s"]), fmt_time(r["torch_s"]),
                    "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                    fmt_num(r["pyengine_gbps"]), "-" if share is None else f"{100 * share:.0f}%",
                    fmt_num(r["pyengine_gflops"]), mem, _note(r["error"] or r["torch_error"] or "", note_width)])
    return out


NUM_HEADER = ["op", "size", "dtype", "backend", "pyengine max", "pyengine mean", "torch max", "torch mean", "note"]


def _note(text, width):
    return text if width is None or len(text) <= width else text[:width - 3] + "..."


def numeric_rows(results, note_width=None):
    return [[n["op"], n["size"], n["dtype"], n["backend"], fmt_err(n["pyengine_max_rel"]),
             fmt_err(n["pyengine_mean_rel"]), fmt_err(n["torch_max_rel"]), fmt_err(n["torch_mean_rel"]),
             _note(n["error"] or "", note_width)] for n in results["numerics"]]


def text(results):
    bw, m, c = results["bandwidth"], results["machine"], results["config"]
    head = (f"pyengine bench on {results['config']['device']} ({m['cpu']}, {m['torch_threads']} threads"
            f"{', ' + m['gpu'] if m.get('gpu') else ''}), torch {m['torch']}, dtype "
            f"{', '.join(results['config']['dtypes'])}; machine copy bandwidth {bw['gbps']:.1f} GB/s")
    return "\n".join([
        head,
        "times are medians; speedup = torch time / pyengine time (above 1: pyengine faster); GB/s and %BW are "
        "pyengine's, counting the bytes that must move (NOTES.md); peak memory of forward+backward above the inputs",
        *([f"not benchmarked: backend {', '.join(c['not_built'])} is not built here"] if c.get("not_built") else []),
        "", _table(TIME_HEADER, time_rows(results, 60)), "",
        "numerics: relative error against float64 (output and gradients), max and mean",
        _table(NUM_HEADER, numeric_rows(results, 60)),
    ])


def markdown(results):
    def md(header, rows):
        esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])

    m, c, bw = results["machine"], results["config"], results["bandwidth"]
    info = [f"- date: {m['date']}", f"- CPU: {m['cpu']} ({m['cores']} cores, torch uses {m['torch_threads']} threads)",
            f"- GPU: {m.get('gpu') or 'none'}", f"- torch {m['torch']}, python {m['python']}",
            f"- pyengine {m['pyengine']['version']}: backends {', '.join(m['pyengine']['built_backends'])}, "
            f"build {m['pyengine']['build']}",
            f"- device {c['device']}, dtypes {', '.join(c['dtypes'])}, sizes {', '.join(c['sizes'])}, "
            f"backends {', '.join(c['backends'])}"
            + (f" (not built here: {', '.join(c['not_built'])})" if c.get("not_built") else ""),
            f"- machine copy bandwidth: {bw['gbps']:.1f} GB/s ({bw['bytes'] / 2**20:.0f} MiB moved per copy)",
            f"- took {results['seconds']:.0f} s"]
    return "\n\n".join([
        "# pyengine benchmark", "\n".join(info),
        "Times are medians of interleaved rounds (torch.utils.benchmark); speedup = torch time / pyengine time. "
        "GB/s and %BW: pyengine's achieved bandwidth counting the bytes that must move, and its share of the "
        "machine's copy bandwidth. Peak memory: one forward+backward (or training step), above its inputs.",
        "## Speed", md(TIME_HEADER, time_rows(results)),
        "## Numerics", "Relative error against a float64 reference, output and gradients pooled.",
        md(NUM_HEADER, numeric_rows(results)),
    ]) + "\n"


def write_json(results, path):
    def clean(x):  # JSON has no NaN or inf: they become strings
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(clean(results), f, indent=1)


def plot(results, path):
    """Speedup against size, one panel per op; returns None, or why the plot was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    names = list(dict.fromkeys(r["op"] for r in results["timings"]))
    if not names:
        return "nothing was timed"
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    backends = list(results["config"].get("backends", []))
    for ax, name in zip(axes.flat, names):
        mine = [r for r in results["timings"] if r["op"] == name]
        many_dtypes = len({r["dtype"] for r in mine}) > 1
        lines = 0
        for key in dict.fromkeys((r["backend"], r["mode"], r["dtype"]) for r in mine):
            pts = sorted((SIZE_ORDER.index(r["size"]), r["speedup"]) for r in mine
                         if (r["backend"], r["mode"], r["dtype"]) == key and r["speedup"])
            if pts:
                label = " ".join(key if many_dtypes else key[:2])
                color = backends.index(key[0]) if key[0] in backends else len(backends)
                ax.plot(*zip(*pts), marker="o", label=label, color=f"C{color}", ls=STYLES.get(key[1], "-"))
                lines += 1
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(SIZE_ORDER)), SIZE_ORDER)
        if lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no pyengine timing\n(see the errors)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("speedup vs torch")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"pyengine speedup over torch ({results['config']['device']}, "
                 f"{', '.join(results['config']['dtypes'])}; above 1: pyengine faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    skipped = plot(results, os.path.join(out_dir, "speedup.png"))
    results["plot"] = None if skipped else "speedup.png"
    results["plot_skipped"] = skipped
    write_json(results, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    return skipped
