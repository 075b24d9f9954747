#!/usr/bin/env python3
"""Records runs of the SPO paper's own synthetic code (causalml/spo, `synthetic/`) so that spoke
can replay them step for step (tests/spo_reference_replay.rs).

For one seed it does what `synthetic/scripts/run_single.py` does (set_seed, teacher, dataset,
learner) and trains DPO, RSPO and OSPO with the paper code's functions, recording every
`torch.randperm` they draw (the epoch orders), then evaluates with its `evaluate_policy`. It
writes the teacher and initial learner weights, the data, the epoch orders and the β scans as
JSON. Nothing of the paper's code is copied; it is imported from the checkout.

Usage: scripts/spo-reference-replay.py SPO_CHECKOUT OUT.json [--seed 7 --n 260 --m 40 --epochs 10 --s 1.5]
Needs torch and numpy.
"""
import argparse, json, sys

ap = argparse.ArgumentParser()
ap.add_argument("spo")
ap.add_argument("out")
ap.add_argument("--seed", type=int, default=7)
ap.add_argument("--n", type=int, default=260)
ap.add_argument("--m", type=int, default=40)
ap.add_argument("--epochs", type=int, default=10)
ap.add_argument("--s", type=float, default=1.5)
args = ap.parse_args()
sys.path.insert(0, args.spo + "/synthetic")
import torch  # noqa: E402
from spo_sim.data import DGPConfig, generate_teacher, sample_dataset  # noqa: E402
from spo_sim.eval import evaluate_policy  # noqa: E402
from spo_sim.methods import OSPOConfig, RSPOConfig, train_dpo, train_ospo, train_rspo  # noqa: E402
from spo_sim.models import MLPPolicy  # noqa: E402
from spo_sim.utils import TrainConfig, set_seed  # noqa: E402

torch.set_num_threads(1)
GRID = [0.2, 0.3, 0.5, 0.8, 1, 1.5, 2, 3, 5, 8, 10, 15, 20, 30, 50, 80, 100, 150, 200, 300, 500, 800, 1000]


def params(model):
    return [p.detach().double().tolist() for p in model.parameters()]


def setup():
    set_seed(args.seed)
    dgp = DGPConfig(d=20, k=10, nu=10.0, s=args.s, tau=0.25)
    teacher = generate_teacher(args.seed, 20, 10, (32, 32))
    data = sample_dataset(args.seed, args.n, args.m, dgp, teacher)
    return dgp, teacher, data, MLPPolicy(20, 10, (32, 32))


out = {"seed": args.seed, "s": args.s, "n": args.n, "m": args.m, "epochs": args.epochs, "runs": {}}
for method in ["dpo", "rspo", "ospo"]:
    dgp, teacher, data, model = setup()
    if "teacher" not in out:
        out.update(teacher=params(teacher), init=params(model),
                   x=data["x"].astype(float).tolist(), x_eval=data["x_eval"].astype(float).tolist(),
                   y0=data["y0"].tolist(), y1=data["y1"].tolist(), z=data["z"].tolist())
    orders, draw = [], torch.randperm

    def recording(*a, **k):
        r = draw(*a, **k)
        orders.append(r.tolist())
        return r

    torch.randperm = recording
    cfg = TrainConfig(batch_size=128, epochs=args.epochs, lr=2e-3)
    zeta = 1.0
    if method == "dpo":
        train_dpo(model, data, cfg)
    elif method == "rspo":
        train_rspo(model, data, cfg, RSPOConfig())
    else:
        train_ospo(model, data, cfg, OSPOConfig(mem_size=0, warm_start_epochs=2))
        # The memory order is drawn first; the warm-up epochs visit it in a random order
        # (`train_idx[torch.randperm(...)]`), the kernel epochs visit 0..n in a random order.
        mem, warm = orders[0], 2
        orders = [[mem[i] for i in o] for o in orders[1 : 1 + warm]] + orders[1 + warm :]
        with torch.no_grad():  # the sign alignment of run_single.py
            x = torch.from_numpy(data["x"])
            y0, y1 = torch.from_numpy(data["y0"]), torch.from_numpy(data["y1"])
            z = torch.from_numpy(data["z"]).float()
            lp = model.log_probs(x)
            t = lp.gather(1, y1[:, None]).squeeze(1) - lp.gather(1, y0[:, None]).squeeze(1)
            zeta = 1.0 if torch.mean((t - t.mean()) * (z - z.mean())).item() >= 0 else -1.0
    torch.randperm = draw
    rw, kl = evaluate_policy(model, teacher, data["x_eval"], dgp, GRID, zeta=zeta)
    out["runs"][method] = {"orders": orders, "avg_reward": rw.tolist(), "avg_kl": kl.tolist()}
    print(method, "epochs", len(orders), "reward at β = 1:", round(float(rw[4]), 5))
json.dump(out, open(args.out, "w"), separators=(",", ":"))
