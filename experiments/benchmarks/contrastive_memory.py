"""Per-device memory and step time of the plain and chunked contrastive losses.

Compiles value_and_grad of both forms (softmax and sigmoid) on simulated CPU devices and reads
XLA's buffer assignment (`compiled.memory_analysis()`, per device). Two sweeps:
- global batch N grows on a fixed number of devices: chunked temp memory should follow
  (N / devices)^2, plain temp memory N x (N / devices);
- devices grow at a fixed per-device batch n (N = n x devices): chunked stays flat, plain
  grows with the number of devices.
Writes a PNG of both curves and prints one JSON line last. Timings on simulated devices share
the host's cores, so they compare the forms with each other, not with real accelerators.

    python experiments/benchmarks/contrastive_memory.py --help
"""

import argparse
import json
import pathlib
import statistics
import time

DEFAULT_OUT = pathlib.Path(__file__).parent / "results"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument(
        "--global-batch",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048, 4096],
        help="global batch sizes N of the first sweep (multiples of --devices)",
    )
    parser.add_argument(
        "--per-device", type=int, default=256, help="per-device batch n of the device sweep"
    )
    parser.add_argument("--dim", type=int, default=64, help="embedding width D")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="plot folder")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    # The device count must be set before JAX starts its backend, hence the late imports.
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from navit_seq.losses import contrastive

    temperature, bias = 0.07, -10.0

    def make_step(loss: str, form: str, mesh):
        def step(img, txt, valid, temperature, bias):
            if loss == "softmax":
                if form == "plain":
                    value = contrastive.softmax_contrastive_loss(img, txt, valid, temperature)
                else:
                    value = contrastive.chunked_softmax_contrastive_loss(
                        img, txt, valid, temperature, mesh=mesh
                    )
                return value + 0.0 * bias  # one signature for both losses
            if form == "plain":
                return contrastive.sigmoid_contrastive_loss(img, txt, valid, temperature, bias)
            return contrastive.chunked_sigmoid_contrastive_loss(
                img, txt, valid, temperature, bias, mesh=mesh
            )

        return jax.jit(jax.value_and_grad(step, argnums=(0, 1, 3, 4)))

    def inputs(global_batch: int, mesh):
        rng = np.random.default_rng(0)
        batch_sharded = NamedSharding(mesh, P("data"))
        emb = rng.normal(size=(2, global_batch, args.dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        valid = rng.random(global_batch) < 0.9  # some padding, as packing leaves
        img, txt, valid = (jax.device_put(x, batch_sharded) for x in (emb[0], emb[1], valid))
        return img, txt, valid, jnp.float32(temperature), jnp.float32(bias)

    def measure(loss: str, form: str, mesh, global_batch: int, timed: bool) -> dict:
        step_inputs = inputs(global_batch, mesh)
        compiled = make_step(loss, form, mesh).lower(*step_inputs).compile()
        memory = compiled.memory_analysis()
        # temp: buffers XLA allocates for the step itself (the logits and their gradient);
        # in/out: the sharded embeddings, gradients and loss, the same for both forms.
        figures = {
            "temp_bytes": int(memory.temp_size_in_bytes),
            "in_out_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes),
        }
        if timed:
            jax.block_until_ready(compiled(*step_inputs))  # warm-up
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*step_inputs))
                seconds.append(time.perf_counter() - start)
            figures["step_ms"] = round(1e3 * statistics.median(seconds), 2)
        return figures

    def mesh_of(num_devices: int):
        return jax.make_mesh(
            (num_devices,),
            ("data",),
            axis_types=(AxisType.Auto,),
            devices=jax.devices()[:num_devices],
        )

    losses, forms = ("softmax", "sigmoid"), ("plain", "chunked")
    full_mesh = mesh_of(args.devices)
    batch_sweep = []
    for global_batch in args.global_batch:
        if global_batch % args.devices:
            raise SystemExit(f"--global-batch {global_batch} is not a multiple of --devices.")
        for loss in losses:
            row = {"loss": loss, "global_batch": global_batch, "devices": args.devices}
            for form in forms:
                row[form] = measure(loss, form, full_mesh, global_batch, timed=True)
            _add_scaling_ratios(row)
            batch_sweep.append(row)
            print(json.dumps(row), flush=True)

    device_sweep = []
    device_counts = [d for d in (1, 2, 4, 8, 16) if d <= args.devices]
    for num_devices in device_counts:
        mesh = mesh_of(num_devices)
        global_batch = args.per_device * num_devices
        row = {"loss": "softmax", "global_batch": global_batch, "devices": num_devices}
        for form in forms:
            row[form] = measure("softmax", form, mesh, global_batch, timed=False)
        _add_scaling_ratios(row)
        device_sweep.append(row)
        print(json.dumps(row), flush=True)

    plot_path = _plot(batch_sweep, device_sweep, args)
    print(f"wrote {plot_path}", flush=True)
    summary = {
        "benchmark": "contrastive_memory",
        "platform": "cpu (simulated devices share the host cores)",
        "dim": args.dim,
        "memory": "per device, XLA buffer assignment of value_and_grad",
        "batch_sweep": batch_sweep,
        "device_sweep": device_sweep,
        "plot": str(plot_path),
    }
    print(json.dumps(summary))


def _add_scaling_ratios(row: dict) -> None:
    """Temp memory in units of the expected growth: constant where the expectation holds."""
    per_device = row["global_batch"] // row["devices"]
    float32_bytes = 4
    # chunked: [n, n] blocks; plain: [n, N] row blocks of the full logits.
    row["chunked"]["per_n_squared"] = round(
        row["chunked"]["temp_bytes"] / (float32_bytes * per_device**2), 2
    )
    row["plain"]["per_n_times_N"] = round(
        row["plain"]["temp_bytes"] / (float32_bytes * per_device * row["global_batch"]), 2
    )


def _plot(batch_sweep: list[dict], device_sweep: list[dict], args) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2.0**20
    fig, (by_batch, by_devices, by_time) = plt.subplots(1, 3, figsize=(15, 4.2))
    softmax = [row for row in batch_sweep if row["loss"] == "softmax"]
    batch = [row["global_batch"] for row in softmax]
    for form, marker in (("plain", "o"), ("chunked", "s")):
        temp = [row[form]["temp_bytes"] / mib for row in softmax]
        by_batch.plot(batch, temp, marker=marker, label=f"{form} (measured)")
    # Expected shapes, anchored at the largest batch.
    n_last, temp_plain, temp_chunked = (
        batch[-1],
        softmax[-1]["plain"]["temp_bytes"] / mib,
        softmax[-1]["chunked"]["temp_bytes"] / mib,
    )
    quadratic = [(b / n_last) ** 2 for b in batch]
    by_batch.plot(batch, [temp_plain * q for q in quadratic], "k:", label="∝ N·(N/devices)")
    by_batch.plot(batch, [temp_chunked * q for q in quadratic], "k--", label="∝ (N/devices)²")
    by_batch.set(
        xscale="log",
        yscale="log",
        xlabel="global batch N",
        ylabel="temp memory per device (MiB)",
        title=f"softmax loss + grad, {args.devices} devices, D={args.dim}",
    )
    by_batch.legend()
    _label_ticks(by_batch, batch)

    devices = [row["devices"] for row in device_sweep]
    for form, marker in (("plain", "o"), ("chunked", "s")):
        temp = [row[form]["temp_bytes"] / mib for row in device_sweep]
        by_devices.plot(devices, temp, marker=marker, label=form)
    by_devices.set(
        xscale="log",
        yscale="log",
        xlabel="devices (N = devices × n)",
        ylabel="temp memory per device (MiB)",
        title=f"fixed per-device batch n={args.per_device}",
    )
    by_devices.legend()
    _label_ticks(by_devices, devices)

    for loss, style in (("softmax", "-"), ("sigmoid", "--")):
        rows = [row for row in batch_sweep if row["loss"] == loss]
        for form, marker in (("plain", "o"), ("chunked", "s")):
            by_time.plot(
                [row["global_batch"] for row in rows],
                [row[form]["step_ms"] for row in rows],
                style,
                marker=marker,
                label=f"{loss} {form}",
            )
    by_time.set(
        xscale="log",
        yscale="log",
        xlabel="global batch N",
        ylabel="value_and_grad step (ms, CPU)",
        title="time per step (simulated devices)",
    )
    by_time.legend()
    _label_ticks(by_time, batch)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "contrastive_memory.png"
    fig.savefig(path, dpi=80)
    return path


def _label_ticks(axes, values: list[int]) -> None:
    axes.set_xticks(values, labels=[str(v) for v in values])
    axes.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)


if __name__ == "__main__":
    main()
