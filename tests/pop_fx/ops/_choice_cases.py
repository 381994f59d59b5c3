"""Cases for every autotuning choice of every ``pop::`` op (``test_choices.py``): odd shapes, fp32 and bf16, batch 1,
3 and 8, each with the op's definition computed independently (fp64 where the op's output is a product).

Run as a script (``TRITON_INTERPRET=1``: the interpreter is chosen when a kernel is defined, so it needs its own
process) it runs every Triton-family choice on CPU tensors and prints one JSON record per case.
"""

from __future__ import annotations

import json
import sys

import torch

from pop_fx import autotune
from pop_fx import partition as P
from pop_fx.ops.layout import padded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = (1, 3, 8)
# One rounding of the output at its scale (fp32 accumulation, a rounding to the dtype), a few for the ops whose
# choices sum partial products in the output dtype or weigh experts: a wrong candidate moves the output by far more.
TOL = {"fp32": 1e-5, "bf16": 2.0 ** -6}
FAMILIES = ("decode", "decode_seq", "experts_decode", "experts_decode/sequence", "values_decode", "proxy_select/int8",
            "proxy_select/int3", "linear", "linear/bias")


def op_of(family: str) -> str:
    return "pop::" + family.split("/")[0]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ints(shape, g, lo=-2, hi=3):
    """Small integers: every GEMV over them is exact in fp32 and in bf16, so each implementation computes the same
    activations and so the same candidates (a selection that hinges on the last bit of a sum would not be a test)."""
    return torch.randint(lo, hi, shape, generator=g).float()


def decode_case(B, dt, seed=0):
    g = _gen(seed)
    n_R, n_C, N, k = 37, 19, 131, 7
    n_rc = n_R + n_C
    wd = torch.zeros(N, padded(n_rc))  # the layout's rows are padded with zeros (layout.ROW_ALIGN)
    wd[:, :n_rc] = torch.randn(N, n_rc, generator=g)
    args = dict(h_rc=torch.randn(B, 1, n_rc, generator=g).to(dt), wd_rc=wd.to(dt), bd=torch.randn(N, generator=g).to(dt),
                wd_norm_c=torch.rand(n_C, generator=g) + 0.1, n_R=n_R, n_select=k)
    h = args["h_rc"].reshape(B, n_rc)
    keep = list(range(n_R)) + [n_R + c for c in P.select(h[:, n_R:], args["wd_norm_c"], k).tolist()]
    y = h.double()[:, keep] @ args["wd_rc"].double()[:, keep].t() + args["bd"].double()
    return args, y.reshape(B, 1, N)


def decode_seq_case(B, dt, seed=0):
    g = _gen(seed)
    d_ff, N, n_R, n_C, k, S = 45, 23, 11, 13, 5, 8
    rc = torch.stack([torch.cat([p[:n_R].sort().values, p[n_R:n_R + n_C].sort().values])
                      for p in (torch.randperm(d_ff, generator=g) for _ in range(S))])
    args = dict(h=torch.randn(B, 1, d_ff, generator=g).to(dt), wd=torch.randn(N, d_ff, generator=g).to(dt),
                bd=torch.randn(N, generator=g).to(dt), wd_norm=torch.rand(d_ff, generator=g) + 0.1, rc_idx=rc, n_R=n_R,
                n_select=k, flags=0)
    h = args["h"].reshape(B, d_ff)
    y = torch.empty(B, N, dtype=torch.float64)
    for b in range(B):
        c = rc[b, n_R:]
        keep = rc[b, :n_R].tolist() + c[P.select(h[b:b + 1, c], args["wd_norm"][c], k)].tolist()
        y[b] = h[b].double()[keep] @ args["wd"].double()[:, keep].t() + args["bd"].double()
    return args, y.reshape(B, 1, N)


def experts_case(B, dt, seed=0, per_sequence=False):
    from pop_fx.ops.experts_decode import experts_decode_loop
    from pop_fx.ops.layout import write_expert_partition
    from pop_fx.partition import down_column_norm, partition_sizes

    g = _gen(seed)
    E, H, d_ff, k, r, gamma = 5, 12, 37, 2, 0.5, 0.3
    G = B if per_sequence else 1
    gate_up, down = _ints((E, 2 * d_ff, H), g), _ints((E, H, d_ff), g)
    z = partition_sizes(d_ff, r, gamma)
    n_rc = z.n_R + z.n_C
    rc_idx = torch.zeros(E, G, n_rc, dtype=torch.long)
    wd_norm_c, dense = torch.zeros(E, G, z.n_C), torch.zeros(E, G, dtype=torch.bool)
    w_in = torch.zeros((0,) if per_sequence else (E, 2 * n_rc, H))
    wd_rc = torch.zeros((0,) if per_sequence else (E, H, padded(n_rc)))
    for e in range(E):
        write_expert_partition(e, torch.rand(G, d_ff, generator=g), torch.zeros(G, dtype=torch.bool), z, gate_up, down,
                               down_column_norm(down, -1), rc_idx, wd_norm_c, dense, w_in, wd_rc)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B)])
    weights = torch.randint(1, 4, (B, k), generator=g).float() / 4  # exact in bf16
    args = dict(hidden=_ints((B, H), g).to(dt), top_k_index=idx, top_k_weights=weights.to(dt), gate_up=gate_up.to(dt),
                down=down.to(dt), rc_idx=rc_idx, wd_norm_c=wd_norm_c, dense=dense, w_in=w_in.to(dt),
                wd_rc=wd_rc.to(dt), n_R=z.n_R, n_select=z.n_select, activation="relu", per_sequence=per_sequence,
                empty_dense=False)
    loop_args = {k_: v for k_, v in args.items() if k_ != "empty_dense"}
    ref = experts_decode_loop(**{k_: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                 for k_, v in loop_args.items()})
    return args, ref


def values_case(B, dt, seed=0):
    from pop_fx.activations import ACTIVATIONS
    from pop_fx.lowbit import down_channel_major, values_tables
    from pop_fx.ops.values_decode import _chosen

    g = _gen(seed)
    d, d_ff, N, n_R, n_C, k = 32, 41, 19, 9, 16, 6  # d: _weight_int8pack_mm crashes (SIGSEGV) unless 16 | d
    gate, up, wd = torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g), torch.randn(N, d_ff, generator=g)
    q, s = values_tables(gate, up)
    p = torch.randperm(d_ff, generator=g)
    rc = torch.cat([p[:n_R].sort().values, p[n_R:n_R + n_C].sort().values])
    wd = wd.to(dt)
    args = dict(x=torch.randn(B, 1, d, generator=g).to(dt), q=q, s=s, wd_t=down_channel_major(wd), wd=wd,
                bd=torch.randn(N, generator=g).to(dt), rc_idx=rc[None], wd_norm_c=torch.rand(n_C, generator=g) + 0.1,
                n_R=n_R, n_select=k, d_ff=d_ff, act=ACTIVATIONS.index("silu"))
    idx, h_sel = _chosen(args["x"], q, s, args["rc_idx"], args["wd_norm_c"], n_R, k, d_ff, args["act"])
    y = h_sel.to(dt).double() @ wd.double()[:, idx].t() + args["bd"].double()
    return args, y.reshape(B, 1, N)


def proxy_case(B, dt, seed=0, fmt="int8"):
    from pop_fx.activations import ACTIVATIONS
    from pop_fx.lowbit import proxy_tables
    from pop_fx.ops.proxy_select import proxy_activation

    g = _gen(seed)
    d, d_ff, n_R, n_C, k = 40, 37, 9, 21, 8
    q, s = proxy_tables(torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g), fmt)
    p = torch.randperm(d_ff, generator=g)
    rc = torch.cat([p[:n_R].sort().values, p[n_R:n_R + n_C].sort().values])[None]
    act = ACTIVATIONS.index("silu")
    args = dict(x=torch.randn(B, 1, d, generator=g).to(dt), q=q, s=s, rc_idx=rc, wd_norm_c=torch.rand(n_C, generator=g) + 0.1,
                n_R=n_R, n_select=k, d_ff=d_ff, act=act)
    h_c = proxy_activation(args["x"].reshape(B, d), q, s, rc[0, n_R:], d_ff, act, both=True)
    return args, P.select(h_c, args["wd_norm_c"], k)


def linear_case(B, dt, bias: bool, seed=0):
    """A decode linear of odd sizes (B rows of one token, 37 features -> 29), the definition in fp64."""
    g = _gen(seed)
    x, w = torch.randn(B, 1, 37, generator=g).to(dt), torch.randn(29, 37, generator=g).to(dt)
    b = torch.randn(29, generator=g).to(dt) if bias else None
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    return dict(x=x, weight=w, bias=b), ref


def case(family: str, B: int, dtype: str):
    dt = DTYPES[dtype]
    if family.startswith("linear"):
        return linear_case(B, dt, bias=family.endswith("bias"))
    if family == "decode":
        return decode_case(B, dt)
    if family == "decode_seq":
        return decode_seq_case(B, dt)
    if family.startswith("experts_decode"):
        return experts_case(B, dt, per_sequence=family.endswith("sequence"))
    if family == "values_decode":
        return values_case(B, dt)
    return proxy_case(B, dt, fmt=family.split("/")[1])


def error(family: str, got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(error, allowed) of an output against the definition: a max abs error against the dtype's tolerance at the
    output's scale, or for a selection 0/1 (the same set or not) against 0."""
    if family.startswith("proxy_select"):
        return float(not torch.equal(got.sort().values, ref.sort().values)), 0.0
    return (got.double() - ref.double()).abs().max().item(), None


def all_cases():
    """(family, choice, dtype, batch) of every choice of every op."""
    reg = autotune.registry()
    return [(f, c.name, d, B) for f in FAMILIES for c in reg[op_of(f)].choices for d in DTYPES for B in BATCHES]


def run_choice(family: str, choice: str, dtype: str, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    args, ref = case(family, B, dtype)
    return autotune.registry()[op_of(family)].by_name(choice).fn(**args), ref


def main() -> int:
    launches = [0]
    wrap = torch.library.wrap_triton

    def counting(kernel):  # every Triton choice must launch a kernel (not fall back to torch on CPU tensors)
        launches[0] += 1
        return wrap(kernel)

    torch.library.wrap_triton = counting
    out = []
    for family, choice, dtype, B in all_cases():
        if autotune.registry()[op_of(family)].by_name(choice).family != "triton":
            continue
        launches[0] = 0
        try:
            got, ref = run_choice(family, choice, dtype, B)
            err, _ = error(family, got, ref)
            scale = 0.0 if family.startswith("proxy_select") else ref.abs().max().item()
            out.append(dict(family=family, choice=choice, dtype=dtype, batch=B, err=err, scale=scale, fail=None,
                            launches=launches[0]))
        except Exception as e:  # noqa: BLE001 - reported per case
            out.append(dict(family=family, choice=choice, dtype=dtype, batch=B, err=None, scale=None,
                            fail=f"{type(e).__name__}: {e}"[:500]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
