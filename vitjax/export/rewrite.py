"""Re-tracing a function with some jax primitives replaced (inference only).

`substitute(fn, example, {'sort': sort_by_top_k})` returns a function that computes `fn`, except
that every `sort` equation of its jaxpr, also inside nested calls (jit, custom_jvp/vjp, remat),
is computed by `sort_by_top_k` instead. The TFLite exporter uses it to avoid an op the converter
cannot lower; the CPU profile of the forward pass uses it to price an op by leaving it out.
Nested calls that contain a replaced primitive are inlined, which drops their custom
differentiation rules: the result is for inference, not for `jax.grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

# name -> fn(operands: list, **params) -> list of outputs (one per outvar of the equation)
Replacements = Mapping[str, Callable[..., list]]


def uses(jaxpr, names) -> bool:
    """Whether `jaxpr` (or a jaxpr nested in it) has an equation of a primitive in `names`."""
    from jax.extend import core

    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            return True
        if any(uses(sub, names) for sub in core.jaxprs_in_params(eqn.params)):
            return True
    return False


def _called_jaxpr(params, names):
    """(jaxpr, consts) of a jaxpr in `params` that uses a primitive in `names`, else None."""
    from jax.extend import core

    for value in params.values():
        if isinstance(value, core.ClosedJaxpr) and uses(value.jaxpr, names):
            return value.jaxpr, value.consts
        if isinstance(value, core.Jaxpr) and uses(value, names):
            return value, ()
    return None


def evaluate(jaxpr, consts, args, replacements: Replacements) -> list:
    """Evaluates `jaxpr` on `args` (under any trace), computing replaced primitives with
    `replacements`."""
    from jax.extend import core

    env = {}

    def read(var):
        return var.val if isinstance(var, core.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        inner = None if name in replacements else _called_jaxpr(eqn.params, replacements)
        if name in replacements:
            outvals = replacements[name](invals, **eqn.params)
        elif inner is not None:
            outvals = evaluate(*inner, invals, replacements)
        else:
            bind_params, subfuns = eqn.primitive.get_bind_params(eqn.params), ()
            if isinstance(bind_params, tuple):  # jax < 0.7 returned (subfuns, params)
                subfuns, bind_params = bind_params
            outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for var, value in zip(eqn.outvars, outvals, strict=True):
            if not isinstance(var, core.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


def substitute(fn: Callable, example, replacements: Replacements) -> Callable:
    """`fn` (of one array argument shaped like `example`) with `replacements` applied; `fn`
    itself when its jaxpr uses none of the replaced primitives."""
    import jax

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(example)
    if not uses(closed.jaxpr, replacements):
        return fn
    out_tree = jax.tree.structure(out_shape)

    def substituted(x):
        return jax.tree.unflatten(out_tree, evaluate(closed.jaxpr, closed.consts, [x],
                                                     replacements))

    return substituted
