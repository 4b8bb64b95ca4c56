"""Writing the results: the terminal table, results.json, results.md and the speedup plot."""
import json
import math
import os

from . import peers
from .ops import NO_GRAD

SIZE_ORDER = ("tiny", "medium", "large")
PLOT_MODES = ("forward+backward", "step")  # what a training step costs; the other modes are in results.md


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


def fmt_spread(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_share(r):
    share = r.get("pyengine_bw_share")
    if share is None:
        return "-"
    return "cache" if r.get("cache_resident") else f"{100 * share:.0f}%"


GRAD_IN_FORWARD_NOTE = {"forward": "forward computes the gradient too",
                        "backward": "backward only scales the forward's gradient"}


def notes(r, peer_names=()):
    """The row's flags, then its error: what a reader must know before trusting its speedup (and, for each peer
    in peer_names, its speedup over that peer)."""
    out = ["noisy"] if r.get("noisy") else []
    if r.get("grad_in_forward") and r["mode"] in GRAD_IN_FORWARD_NOTE:
        out.append(GRAD_IN_FORWARD_NOTE[r["mode"]])
    for peer in peer_names:
        label = peers.LABELS[peer]
        if r.get(f"{peer}_error"):
            out.append(f"{label} failed: {r[f'{peer}_error']}")
        elif r.get(f"{peer}_noisy"):
            out.append(f"{label} noisy")
        if r.get(f"{peer}_warning"):
            out.append(f"{label} warned: {r[f'{peer}_warning']}")
    return out + [e for e in (r["error"], r["torch_error"]) if e][:1]


TIME_HEADER = ["op", "size", "mode", "dtype", "backend", "pyengine", "torch", "spread pe/torch", "speedup", "GB/s",
               "%BW", "GFLOP/s", "peak MiB pe/torch", "note"]
COMPILE_COLUMNS = ["compile", "vs compile"]  # after speedup, with --peer compile


def _compiled(results):
    return "compile" in results["config"].get("peers", ())


def time_header(results):
    if not _compiled(results):
        return TIME_HEADER
    at = TIME_HEADER.index("speedup") + 1
    return TIME_HEADER[:at] + COMPILE_COLUMNS + TIME_HEADER[at:]


def fmt_speedup(x):
    return "-" if x is None else f"{x:.2f}x"


def time_rows(results, note_width=None):
    compiled = _compiled(results)
    out = []
    for r in results["timings"]:
        mem = ""
        if r.get("pyengine_peak_bytes") is not None or r.get("torch_peak_bytes") is not None:
            mem = f"{fmt_mem(r.get('pyengine_peak_bytes'))} / {fmt_mem(r.get('torch_peak_bytes'))}"
        spread = ""
        if r["pyengine_s"] is not None or r["torch_s"] is not None:
            spread = f"{fmt_spread(r.get('pyengine_spread'))} / {fmt_spread(r.get('torch_spread'))}"
        versus = [fmt_time(r.get("compile_s")), fmt_speedup(r.get("speedup_vs_compile"))] if compiled else []
        out.append([r["op"], f"{r['size']} {r['shape']}", r["mode"], r["dtype"], r["backend"],
                    fmt_time(r["pyengine_s"]), fmt_time(r["torch_s"]), spread, fmt_speedup(r["speedup"]), *versus,
                    fmt_num(r["pyengine_gbps"]), fmt_share(r), fmt_num(r["pyengine_gflops"]), mem,
                    _note("; ".join(notes(r, ("compile",) if compiled else ())), note_width)])
    return out


CHUNKED_HEADER = ["op", "size", "mode", "dtype", "backend", "pyengine", "torch", "torch chunked", "vs torch",
                  "vs chunked", "peak MiB pe/torch/chunked", "note"]


def chunked_rows(results, note_width=None):
    """linear_cross_entropy (and its LM head case) beside both of torch's ways: the composition and its chunked
    linear_cross_entropy, time and peak memory side by side, from the same interleaved rounds."""
    out = []
    for r in results["timings"]:
        if "torch_chunked_s" not in r:
            continue
        mem = ""
        if r["mode"] == "forward+backward":
            mem = " / ".join(fmt_mem(r.get(k)) for k in ("pyengine_peak_bytes", "torch_peak_bytes",
                                                          "torch_chunked_peak_bytes"))
        out.append([r["op"], f"{r['size']} {r['shape']}", r["mode"], r["dtype"], r["backend"],
                    fmt_time(r["pyengine_s"]), fmt_time(r["torch_s"]), fmt_time(r["torch_chunked_s"]),
                    fmt_speedup(r["speedup"]), fmt_speedup(r["speedup_vs_torch_chunked"]), mem,
                    _note("; ".join(notes(r, ("torch_chunked",))), note_width)])
    return out


COMPILE_HEADER = ["op", "size", "dtype", "forward", "forward (no grad)", "backward", "forward+backward", "step",
                  "total", "graphs", "note"]


def compile_rows(results, note_width=None):
    """The compiled peer's first call of each mode, in the order they ran (the forward with grad first): the
    compile and recompiles they triggered, plus one call. Never part of a median."""
    out = []
    for c in results.get("compile", []):
        first = c.get("first_call_s") or {}
        note = "; ".join(x for x in (c.get("error"), c.get("warning")) if x)
        firsts = [fmt_time(first.get(mode)) for mode in COMPILE_HEADER[3:8]]
        out.append([c["op"], f"{c['size']} {c['shape']}", c["dtype"], *firsts, fmt_time(c.get("total_s")),
                    c.get("graphs", "-"), _note(note, note_width)])
    return out


def caveats(results):
    """The lines that say how far the speed table can be trusted: its spread, noisy, cache and gradient marks."""
    rows = results["timings"]
    limit = results["config"].get("noisy_spread")
    noisy = sum(1 for r in rows if r.get("noisy"))
    out = [f"spread: the interquartile range of a row's timing rounds over their median, pyengine / torch. "
           f"{noisy} of {len(rows)} rows are marked noisy: a spread above {fmt_spread(limit)} on either side, so "
           f"their speedup may be off by more than that"
           + (" (rerun them on a quieter machine, or with a larger --budget)" if noisy else "")]
    if any(r.get("cache_resident") for r in rows):
        out.append("%BW cache: faster than the machine's copy bandwidth, so the data sat in a cache (or the op "
                   "skipped bytes the floor counts); no share of memory bandwidth applies")
    grad_ops = list(dict.fromkeys(r["op"] for r in rows if r.get("grad_in_forward")))
    if grad_ops:
        out.append(f"{', '.join(grad_ops)}: pyengine's forward also computes the gradient and its backward only "
                   f"scales it, so only their forward+backward and {NO_GRAD} rows compare like with like")
    if _compiled(results):
        out.append("compile: torch.compile (inductor, default mode, dynamic=False) of the torch column's code, timed "
                   "in the same rounds; vs compile = the compiled median / pyengine's (above 1: pyengine faster); "
                   "its first calls, which compile, are in their own table and in no median")
    return out


NUM_HEADER = ["op", "size", "dtype", "backend", "pyengine max", "pyengine mean", "torch max", "torch mean", "note"]


def _note(text, width):
    return text if width is None or len(text) <= width else text[:width - 3] + "..."


def _numeric_note(n):
    out = [n["error"]] if n["error"] else []
    if "torch_chunked_max_rel" in n:  # torch's third way, beside the composition in the torch columns
        out.append(f"torch chunked: {n['torch_chunked_error']}" if n.get("torch_chunked_error") else
                   f"torch chunked max {fmt_err(n['torch_chunked_max_rel'])}, "
                   f"mean {fmt_err(n['torch_chunked_mean_rel'])}")
    return "; ".join(out)


def numeric_rows(results, note_width=None):
    return [[n["op"], n["size"], n["dtype"], n["backend"], fmt_err(n["pyengine_max_rel"]),
             fmt_err(n["pyengine_mean_rel"]), fmt_err(n["torch_max_rel"]), fmt_err(n["torch_mean_rel"]),
             _note(_numeric_note(n), note_width)] for n in results["numerics"]]


CHUNKED_TITLE = ("linear_cross_entropy against torch's two ways, from the same rounds: torch = "
                 "F.cross_entropy(F.linear(x, w, b), t), torch chunked = F.linear_cross_entropy(x, w, t, "
                 "options=LinearCrossEntropyOptions()); vs = that time / pyengine's; peak memory of forward+backward "
                 "above the inputs. linear_cross_entropy_lm_head is an LM head: 4096 tokens x 1024 -> 32000 classes, "
                 "no bias. torch chunked's backward row reruns a graph kept with allow_retain_graph=True (a "
                 "gradient-sized copy per call)")
COMPILE_TITLE = ("torch.compile first calls (each compile and recompile included, in the order run; graphs: how "
                 "many dynamo compiled for the case); each case compiles cold (dynamo reset, an empty inductor cache); "
                 "the medians above exclude them")


def _extra_tables(results, note_width, table):
    out = []
    chunked = chunked_rows(results, note_width)
    if chunked:
        out += [CHUNKED_TITLE, table(CHUNKED_HEADER, chunked)]
    if _compiled(results):
        start = results.get("compile_start_s")
        title = COMPILE_TITLE + ("" if start is None else f"; the compiler's one-time start in this process, "
                                                          f"before the first case: {fmt_time(start)}")
        out += [title, table(COMPILE_HEADER, compile_rows(results, note_width))]
    return out


def text(results):
    bw, m, c = results["bandwidth"], results["machine"], results["config"]
    head = (f"pyengine bench on {results['config']['device']} ({m['cpu']}, {m['torch_threads']} threads"
            f"{', ' + m['gpu'] if m.get('gpu') else ''}), torch {m['torch']}, dtype "
            f"{', '.join(results['config']['dtypes'])}; machine copy bandwidth {bw['gbps']:.1f} GB/s")
    return "\n".join([
        head,
        "times are medians; speedup = torch time / pyengine time (above 1: pyengine faster); GB/s and %BW are "
        "pyengine's, counting the bytes that must move (NOTES.md); peak memory of forward+backward above the inputs",
        *caveats(results),
        *([f"not benchmarked: backend {', '.join(c['not_built'])} is not built here"] if c.get("not_built") else []),
        "", _table(time_header(results), time_rows(results, 60)), "",
        *[x for t in _extra_tables(results, 60, _table) for x in (t, "")],
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
        "machine's copy bandwidth. Peak memory: one forward+backward (or training step), above its inputs. "
        "speedup.png draws the forward+backward (and training step) speedups; every mode is here.",
        "\n".join(f"- {line}" for line in caveats(results)),
        "## Speed", md(time_header(results), time_rows(results)),
        *_extra_tables(results, None, md),
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


def _plot_label(r):
    return f"{r['op']} (step)" if r["mode"] == "step" else r["op"]


def plot_data(results):
    """What speedup.png draws: one panel per backend (and dtype), one group of bars per op, one bar per size that
    ran, each the forward+backward (or training step) speedup with its noisy flag. Forward-only and
    backward-only rows stay in results.md: a backward that only scales a saved gradient would read as a speedup
    that no training step sees."""
    rows = [r for r in results["timings"] if r["mode"] in PLOT_MODES]
    many_dtypes = len({r["dtype"] for r in rows}) > 1
    panels = list(dict.fromkeys((r["backend"], r["dtype"]) for r in rows))
    return {
        "panels": [f"backend {b}" + (f", {d}" if many_dtypes else "") for b, d in panels],
        "ops": list(dict.fromkeys(_plot_label(r) for r in rows)),
        "sizes": [s for s in SIZE_ORDER if any(r["size"] == s for r in rows)],
        "bars": [{"panel": panels.index((r["backend"], r["dtype"])), "op": _plot_label(r), "size": r["size"],
                  "speedup": r["speedup"], "noisy": bool(r.get("noisy"))} for r in rows],
    }


def plot(results, path):
    """speedup.png: plot_data's bars, each drawn from 1 (torch's speed) to its speedup on a log axis, so faster
    reaches right and slower left; returns None, or why the plot was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    data = plot_data(results)
    if not data["bars"]:
        return "nothing was timed"
    ops, sizes, panels = data["ops"], data["sizes"], data["panels"]
    height = 0.8 / len(sizes)
    size = (2.8 + 4.5 * len(panels), 1.8 + 0.16 * len(ops) * (len(sizes) + 0.6))  # inches: ~0.16 a bar
    fig, axes = plt.subplots(1, len(panels), figsize=size, sharex=True, sharey=True, squeeze=False,
                             layout="constrained")
    known = [b["speedup"] for b in data["bars"] if b["speedup"]]
    lo, hi = min(known + [1.0]) / 2, max(known + [1.0]) * 2
    # plain ticks ("0.5x", "2x"): a reader compares bars with numbers, not with powers of ten; 1-2-5 steps while
    # they fit
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0**e for e in decades for m in ((1, 2, 5) if len(decades) <= 4 else (1,))]
    ticks = [t for t in ticks if lo <= t <= hi]
    for b in data["bars"]:
        ax = axes[0][b["panel"]]
        y = ops.index(b["op"]) + (sizes.index(b["size"]) - (len(sizes) - 1) / 2) * height
        color = f"C{SIZE_ORDER.index(b['size'])}"
        if b["speedup"] is None:
            ax.text(1.0, y, " error", va="center", fontsize=7, color=color)
            continue
        ax.barh(y, b["speedup"] - 1.0, left=1.0, height=0.9 * height, color=color,
                hatch="////" if b["noisy"] else None, edgecolor="black" if b["noisy"] else color, linewidth=0.4)
        faster = b["speedup"] >= 1
        ax.text(b["speedup"], y, f" {b['speedup']:.3g}x ", va="center", ha="left" if faster else "right",
                fontsize=6.5)
    for ax, title in zip(axes[0], panels):
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("speedup over torch (log scale; right of 1: pyengine faster)")
    axes[0][0].set_yticks(range(len(ops)), ops)
    axes[0][0].invert_yaxis()
    handles = [Patch(color=f"C{SIZE_ORDER.index(s)}", label=s) for s in sizes]
    if any(b["noisy"] for b in data["bars"]):
        limit = results["config"].get("noisy_spread")
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="////",
                             label=f"noisy: rounds' spread above {fmt_spread(limit)}, rerun"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(f"pyengine speedup over torch: forward+backward and training step\n({results['config']['device']}, "
                 f"{', '.join(results['config']['dtypes'])}; every mode in results.md)", fontsize=10)
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
