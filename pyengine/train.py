"""`python -m pyengine train`: the origin notes' models trained with mini-batch gradient descent on pyengine.

  linear  the notes' LinearModel: x = [1, 2, 3], y = [2, 4, 6], Linear(1, 1), MSELoss(sum), SGD lr 0.01
  mlp     an 8 -> 6 -> 4 -> 1 sigmoid network, binary cross-entropy, on scikit-learn's breast-cancer set
  digits  a 64 -> hidden -> 10 ReLU network, softmax cross-entropy, on scikit-learn's 8x8 digits

Every step is the loop of the notes: forward, loss, zero_grad, backward (the chain rule, run by pyengine's
backward kernels), then w <- w - lr * grad. --compare-torch trains the same model in torch.nn from the same
initial weights on the same mini-batches; --ddp N runs it in N processes under DistributedDataParallel.
--fused (mlp, digits) trains a pyengine.nn.FusedMLP instead, whose training_step runs that whole loop body as
one call: the same numbers, without autograd's and torch.optim's per-call costs.

Each epoch line shows the epoch's mean mini-batch loss; the final loss is the last epoch's mean. --json adds
every mini-batch's loss and, for linear, the learned w and b. Progress bars run only on a terminal.
"""
import argparse
import json
import math
import os
import sys
import time
from typing import NamedTuple, Optional

import torch

import pyengine
import pyengine.nn as pnn

MODELS = {
    # epochs, batch size, learning rate
    "linear": (500, 3, 0.01),
    "mlp": (100, 32, 0.5),
    "digits": (40, 32, 0.1),
}


def load_data(name, seed=0):
    """(x_train, y_train, x_test, y_test) as float32/int64 tensors; test is None for the notes' toy data."""
    if name == "linear":
        x = torch.tensor([[1.0], [2.0], [3.0]])
        return x, 2 * x, None, None
    try:
        from sklearn.datasets import load_breast_cancer, load_digits
    except ImportError:
        raise SystemExit("pyengine train: the mlp and digits models use scikit-learn's bundled data sets: "
                         "pip install scikit-learn") from None
    if name == "mlp":
        data = load_breast_cancer()
        x, y = torch.tensor(data.data[:, :8], dtype=torch.float32), torch.tensor(data.target, dtype=torch.float32)
        y = y.unsqueeze(1)
    else:
        data = load_digits()
        x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)  # standardize with training statistics only
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


# --fused: the FusedMLP of each model (its state_dict is the Sequential's) and its training_step loss
FUSED = {"mlp": (lambda hidden: pnn.FusedMLP([8, 6, 4, 1], activation="sigmoid"), "bce_with_logits"),
         "digits": (lambda hidden: pnn.FusedMLP([64, hidden, 10], activation="relu"), "cross_entropy")}


def build_model(name, lib, hidden=64):
    """The same architecture from torch.nn or pyengine.nn (lib), with its loss."""
    if name == "linear":
        return torch.nn.Sequential(lib.Linear(1, 1)), lib.MSELoss(reduction="sum")
    if name == "mlp":
        # The notes' 8 -> 6 -> 4 -> 1 with sigmoids; the last sigmoid is fused into the loss (BCE with logits),
        # which stays finite where sigmoid followed by log would reach log(0).
        model = torch.nn.Sequential(lib.Linear(8, 6), lib.Sigmoid(), lib.Linear(6, 4), lib.Sigmoid(), lib.Linear(4, 1))
        return model, lib.BCEWithLogitsLoss()
    return torch.nn.Sequential(lib.Linear(64, hidden), lib.ReLU(), lib.Linear(hidden, 10)), lib.CrossEntropyLoss()


def batches(n, batch_size, epoch, seed):
    """The mini-batches of one epoch: a fresh shuffle per epoch, the same for every model and process."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order.split(batch_size)


def accuracy(model, name, x, y):
    if x is None:
        return None
    with torch.no_grad():
        out = model(x)
    pred = (out > 0).float() if name == "mlp" else out.argmax(1)
    return (pred == y).float().mean().item()


def progress(iterable, desc, enabled):
    """A tqdm bar on a terminal; none where stderr is a file or a pipe, which would keep every bar's first
    frame (0%) in the log: there the epoch lines are the progress."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    try:
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, leave=False, unit="batch")
    except ImportError:
        return iterable


def fmt_seconds(s):
    # an epoch of the linear model is a few hundred microseconds: seconds to three places would read 0.000
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


class Trained(NamedTuple):
    loss: list  # every mini-batch's loss, in order
    epoch_loss: list  # each epoch's mean of its mini-batch losses
    state: dict  # the final state_dict
    accuracy: Optional[float]  # on the held-out split; None for the linear model's toy data


def train(name, lib, init_state, args, rank=0, world=1, show=True):
    """Trains one model; returns a Trained. Under DDP (world > 1) each process takes its share of every global
    mini-batch, and the loss is scaled so that DDP's gradient average equals the gradient of the global batch's
    loss."""
    x, y, x_test, y_test = load_data(name, args.seed)
    fused = getattr(args, "fused", False) and lib is pnn
    model, criterion = (FUSED[name][0](args.hidden), None) if fused else build_model(name, lib, args.hidden)
    model.load_state_dict(init_state)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    curve, epoch_loss = [], []
    for epoch in range(args.epochs):
        first, start = len(curve), time.perf_counter()
        for idx in progress(batches(len(x), args.batch_size, epoch, args.seed), f"epoch {epoch + 1}/{args.epochs}",
                            show and args.epochs <= 100):
            local = idx.tensor_split(world)[rank] if world > 1 else idx
            if fused:  # forward, loss, zero_grad, backward and w <- w - lr * grad, as one call
                curve.append(model.training_step(x[local], y[local], args.lr, loss=FUSED[name][1]).item())
                continue
            out = model(x[local])
            loss = criterion(out, y[local])
            logged = loss.detach()
            if world > 1:  # mean over the local rows -> share of the global batch's mean, times world for DDP
                share = len(local) / len(idx) if criterion.reduction == "mean" else 1.0
                logged = logged * share
                torch.distributed.all_reduce(logged)  # the global batch's loss, for the curve
                loss = loss * share * world
            opt.zero_grad()
            loss.backward()
            opt.step()  # w <- w - lr * grad
            curve.append(logged.item())
        seconds = time.perf_counter() - start
        epoch_loss.append(sum(curve[first:]) / (len(curve) - first))
        if show and (epoch + 1) % max(1, args.epochs // 10) == 0:
            print(f"epoch {epoch + 1:4d}  mean loss {epoch_loss[-1]:<10.6g}  ({fmt_seconds(seconds)})", flush=True)
    plain = model.module if world > 1 else model
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    return Trained(curve, epoch_loss, state, accuracy(plain, name, x_test, y_test))


def _ddp_worker(rank, world, name, init_state, args, port, result_file):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with pyengine.use_backend(args.backend) if args.backend else _nullcontext():
            trained = train(name, pnn, init_state, args, rank, world, show=rank == 0)
        if rank == 0:
            torch.save(trained._asdict(), result_file)
        # every rank waits here until all are done: a rank that tears down and exits while a peer still talks
        # to it makes the peer's gloo thread throw "Connection closed by peer" and abort the process
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train_ddp(name, init_state, args):
    """Runs train() in args.ddp processes (gloo, this machine) and returns rank 0's result."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "rank0.pt")
        mp.spawn(_ddp_worker, args=(args.ddp, name, init_state, args, port, result_file), nprocs=args.ddp, join=True)
        return Trained(**torch.load(result_file))


def at_least(minimum, kind):
    """An argparse type: kind(text), refused when not finite or below minimum, with a message saying so."""
    def parse(text):
        value = kind(text)  # a ValueError reads "invalid int value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pyengine train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="linear")

    def default(i):  # each model's own, from MODELS
        return "default: " + "; ".join(f"{m} {MODELS[m][i]}" for m in sorted(MODELS))

    p.add_argument("--epochs", type=at_least(1, int), metavar="N", help=f"passes over the training set ({default(0)})")
    p.add_argument("--batch-size", type=at_least(1, int), metavar="N", help=f"rows per mini-batch ({default(1)})")
    p.add_argument("--lr", type=at_least(0, float),
                   help=f"learning rate; 0 leaves the weights where they start ({default(2)})")
    p.add_argument("--hidden", type=at_least(1, int), default=64, help="hidden width of the digits model")
    p.add_argument("--backend", choices=pyengine._backend.BACKENDS, help="default: chosen by device")
    p.add_argument("--compare-torch", action="store_true", help="also train torch.nn's model and compare")
    p.add_argument("--plot", help="PNG of the loss curves")
    p.add_argument("--json", help="write the curves and final metrics here")
    p.add_argument("--ddp", type=at_least(0, int), default=0, metavar="N",
                   help="train in N processes with DDP (gloo); 0 or 1: one process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action="store_true",
                   help="mlp, digits: train a pyengine.nn.FusedMLP with its one-call training_step")
    args = p.parse_args(argv)
    if args.fused and (args.model not in FUSED or args.ddp > 1):
        p.error("--fused trains the mlp and digits models in one process (FusedMLP.training_step is plain SGD on "
                "the mean loss; the linear model's loss is a sum, and DDP needs autograd's gradient hooks)")
    epochs, batch_size, lr = MODELS[args.model]
    args.epochs = epochs if args.epochs is None else args.epochs
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    args.lr = lr if args.lr is None else args.lr
    return args


LOSS_NOTE = ("loss: every mini-batch's loss in order; epoch_loss: each epoch's mean of them; final_loss: the last "
             "epoch's mean")


def summary(name, trained):
    """The JSON entry of one trained model: its losses, accuracy, and for the linear model the learned w and b."""
    out = {"loss": trained.loss, "epoch_loss": trained.epoch_loss, "final_loss": trained.epoch_loss[-1],
           "accuracy": trained.accuracy}
    if name == "linear":  # the notes' question: did w reach 2 and b reach 0?
        out.update(w=trained.state["0.weight"].item(), b=trained.state["0.bias"].item())
    return out


def describe(name, s):
    """One line of what a model ended with."""
    line = f"final loss {s['final_loss']:.6g} (the last epoch's mean)"
    if s["accuracy"] is not None:
        line += f", held-out accuracy {s['accuracy']:.2%}"
    if name == "linear":
        line += f", w = {s['w']:.4f}, b = {s['b']:.4f}"
    return line


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    init_state = build_model(args.model, pnn, args.hidden)[0].state_dict()
    print(f"pyengine train --model {args.model}: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"backend {args.backend or 'by device'}{f', DDP x{args.ddp}' if args.ddp > 1 else ''}"
          f"{', FusedMLP.training_step' if args.fused else ''}")
    start = time.perf_counter()
    if args.ddp > 1:
        trained = train_ddp(args.model, init_state, args)
    else:
        with pyengine.use_backend(args.backend) if args.backend else _nullcontext():
            trained = train(args.model, pnn, init_state, args)
    result = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "backend": args.backend, "ddp": args.ddp, "fused": args.fused, "seconds": time.perf_counter() - start,
              "loss_note": LOSS_NOTE, "pyengine": summary(args.model, trained)}
    print(f"pyengine: {describe(args.model, result['pyengine'])} ({fmt_seconds(result['seconds'])})")
    if args.compare_torch:
        theirs = train(args.model, torch.nn, init_state, args, show=False)
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(trained.loss, theirs.loss))
        result["torch"] = summary(args.model, theirs)
        result["max_relative_loss_difference"] = diff
        print(f"torch.nn: {describe(args.model, result['torch'])}")
        print(f"largest relative difference between the two mini-batch loss curves: {diff:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


def plot_series(result):
    """The lines of the --plot figure, as (label, x in epochs, loss, style): each mini-batch's loss, faint (it
    jumps with the batch drawn), and each epoch's mean over it, bold, for pyengine; torch.nn's epoch means
    dashed (its mini-batch losses match pyengine's to 1e-5 and would hide them). A model with one mini-batch
    per epoch (linear) has one line each: its mini-batch loss is its epoch mean."""
    out = []
    for key, name, style in (("pyengine", "pyengine", {"color": "C0"}),
                             ("torch", "torch.nn", {"color": "C1", "linestyle": "--"})):
        if key not in result:
            continue
        loss, means = result[key]["loss"], result[key]["epoch_loss"]
        steps = len(loss) // len(means)  # mini-batches per epoch: the same every epoch
        epochs = list(range(1, len(means) + 1))
        if steps == 1:
            out.append((f"{name}, loss (one mini-batch per epoch)", epochs, means, {**style, "linewidth": 2}))
            continue
        if key == "pyengine":
            out.append((f"{name}, each mini-batch", [(i + 1) / steps for i in range(len(loss))], loss,
                        {**style, "linewidth": 0.7, "alpha": 0.35}))
        out.append((f"{name}, mean over each epoch", epochs, means, {**style, "linewidth": 2}))
    return out


def plot(result, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, x, y, style in plot_series(result):
        ax.plot(x, y, label=label, **style)
    ax.set(xlabel="epoch", ylabel="loss (log scale)", yscale="log",
           title=f"pyengine train --model {result['model']}: lr {result['lr']}, batch {result['batch_size']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
