"""Self-distillation and EMA vs the baseline, clean and with 20% symmetric label noise.

    python benchmarks/self_distill.py --seeds 3
    python benchmarks/self_distill.py --quick

Same network, data and step budget as benchmarks/baseline.py for every method: digits with the MLP and
MNIST-1D with CNN1D. Methods: baseline; EMA (EMATeacher, evaluated on the EMA weights); PS-KD
(SelfDistill "past_predictions", alpha_T 0.8); EMA-KD (EMATeacher + SelfDistill "ema", T 4, weight 1,
10% ramp-up), also evaluated on the EMA weights. Test accuracy and ECE on clean test labels, mean ± std
over seeds, and the wall-time ratio against the baseline of the same data and noise.
"""

from __future__ import annotations

from common import SETUPS, fit_and_test, machine_line, mean_std, parser, prepare, write_json

from lit_tricks import EMATeacher, SelfDistill


def methods(steps: int) -> dict:
    def ema():
        return EMATeacher(half_life=steps / 20, warmup=True)

    return {
        "baseline": lambda: [],
        "EMA": lambda: [ema()],
        "PS-KD": lambda: [SelfDistill("past_predictions", alpha_T=0.8)],
        "EMA-KD": lambda: [ema(), SelfDistill("ema", temperature=4.0, weight=1.0, rampup_steps=steps // 10)],
    }


def run(data: str, method: str, noise: float, seed: int, quick: bool) -> dict:
    model, datamodule, epochs, steps = prepare(data, noise, seed, quick, quick_epochs=2)
    callbacks = methods(steps)[method]()
    test, seconds, trainer = fit_and_test(model, datamodule, max_epochs=epochs, callbacks=callbacks)
    return {
        "data": data, "method": method, "noise": noise, "seed": seed, "steps": trainer.global_step,
        "acc": test["test/acc"], "ece": test["test/ece"], "nll": test["test/nll"], "fit_seconds": seconds,
    }  # fmt: skip


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", choices=list(SETUPS), nargs="+", default=list(SETUPS), help="data sets to run")
    args = p.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    names = list(methods(1))
    run("digits / MLP", "baseline", 0.0, 0, quick=True)  # untimed warm-up: the first fit pays start-up costs
    runs = [
        run(data, method, noise, seed, args.quick)
        for data in args.data
        for noise in (0.0, 0.2)
        for method in names
        for seed in seeds
    ]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | label noise | method | test acc (%) | ECE (%) | NLL | fit time vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for data in args.data:
        for noise in (0.0, 0.2):
            cell = [r for r in runs if r["data"] == data and r["noise"] == noise]
            base_time = sum(r["fit_seconds"] for r in cell if r["method"] == "baseline") / len(seeds)
            for method in names:
                rows = [r for r in cell if r["method"] == method]
                ratio = sum(r["fit_seconds"] for r in rows) / len(rows) / base_time
                print(
                    f"| {data} | {noise:.0%} | {method} | {mean_std([r['acc'] for r in rows], 100)} "
                    f"| {mean_std([r['ece'] for r in rows], 100)} | {mean_std([r['nll'] for r in rows], digits=3)} "
                    f"| {ratio:.2f}x |"
                )
    suffix = "" if args.data == list(SETUPS) else "_" + "_".join(d.split(" ")[0].lower() for d in args.data)
    path = write_json(args.out, "self_distill" + suffix + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
