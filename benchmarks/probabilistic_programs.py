"""Flow surrogates and NeuTra on JointDistribution models, against TFP's own tools.

(a) Non-centred eight schools: a `tfp_nvp.surrogate_posterior` (RealNVP) trained with
    `tfp.vi.fit_surrogate_posterior`, against a long NUTS reference (posterior means and sds of mu, tau, theta),
    and its ELBO against TFP's affine (full-covariance) surrogate,
    `tfp.experimental.vi.build_affine_surrogate_posterior`, trained for the same number of steps with the same
    optimizer and sample size. ELBOs are estimated on the same number of fresh draws.
(b) NeuTra (`tfp_nvp.neutra_kernel`, NUTS in the flow's base space) against plain NUTS (on the model's
    unconstrained space, `TransformedTransitionKernel` with the default event-space bijector), both with dual
    averaging step-size adaptation, on Neal's funnel (10-D) and the centred eight schools: effective sample size
    (`tfp.mcmc.effective_sample_size`, pooled over chains) per gradient evaluation (leapfrog steps of the kept
    draws, all chains), and the largest R-hat (`tfp.mcmc.potential_scale_reduction`) over all dimensions. The
    gradient evaluations spent training the surrogate are reported separately (steps x sample size).

    python benchmarks/probabilistic_programs.py            # full budget (tens of minutes on 2 cores)
    python benchmarks/probabilistic_programs.py --quick    # smoke run, small budgets: figures are not meaningful

Prints markdown tables and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tfp_nvp  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions

SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], np.float32)
SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], np.float32)


# ---------------------------------------------------------------------------------------------------- models
def eight_schools_noncentred():
    # TFP's own eight-schools example: mu ~ N(0, 10), log_tau ~ N(5, 1), standardized school effects.
    @tfd.JointDistributionCoroutineAutoBatched
    def model():
        mu = yield tfd.Normal(0.0, 10.0, name="mu")
        log_tau = yield tfd.Normal(5.0, 1.0, name="log_tau")
        theta_std = yield tfd.Normal(tf.zeros(8), 1.0, name="theta_std")
        yield tfd.Normal(mu + tf.exp(log_tau) * theta_std, SCHOOLS_SIGMA, name="y")
    return model.experimental_pin(y=SCHOOLS_Y)


def eight_schools_centred():
    @tfd.JointDistributionCoroutineAutoBatched
    def model():
        mu = yield tfd.Normal(0.0, 5.0, name="mu")
        tau = yield tfd.HalfCauchy(0.0, 5.0, name="tau")
        theta = yield tfd.Normal(mu * tf.ones(8), tau, name="theta")
        yield tfd.Normal(theta, SCHOOLS_SIGMA, name="y")
    return model.experimental_pin(y=SCHOOLS_Y)


def funnel():
    @tfd.JointDistributionCoroutineAutoBatched
    def model():
        v = yield tfd.Normal(0.0, 3.0, name="v")
        yield tfd.Normal(tf.zeros(9), tf.exp(v / 2), name="x")
    return model


def schools_summary(draws):
    """Means and sds of mu, tau, theta (theta rebuilt for the non-centred model) from draws [..] flattened."""
    tau = np.exp(draws.log_tau) if hasattr(draws, "log_tau") else draws.tau
    mu = np.ravel(draws.mu)
    if hasattr(draws, "theta_std"):
        theta = (draws.mu[..., None] + np.asarray(tau)[..., None] * draws.theta_std).numpy().reshape(-1, 8)
    else:
        theta = draws.theta.numpy().reshape(-1, 8)
    tau = np.ravel(tau)
    return {"mu": [float(mu.mean()), float(mu.std())], "tau": [float(tau.mean()), float(tau.std())],
            "theta": [[float(m), float(s)] for m, s in zip(theta.mean(0), theta.std(0))]}


# ---------------------------------------------------------------------------------------------------- MCMC
def diagnostics(draws, trace):
    """ESS pooled over chains (min over dims and of the first part), max R-hat, gradient evaluations."""
    ess, rhat = [], []
    for part in tf.nest.flatten(draws):
        n, chains = part.shape[:2]
        flat = tf.reshape(part, [n, chains, -1])
        ess.append(tfp.mcmc.effective_sample_size(flat, cross_chain_dims=1).numpy())
        rhat.append(tfp.mcmc.potential_scale_reduction(flat, independent_chain_ndims=1).numpy())
    grads = int(np.sum(trace["leapfrogs"].numpy()))
    all_ess = np.concatenate(ess)
    return {"ess_min": float(all_ess.min()), "ess_first_part": float(ess[0].min()), "grad_evals": grads,
            "ess_min_per_grad": float(all_ess.min()) / grads, "ess_first_per_grad": float(ess[0].min()) / grads,
            "rhat_max": float(np.concatenate(rhat).max()),
            "accept": float(np.mean(trace["is_accepted"].numpy()))}


def run_chain(kernel, init, args, seed):
    @tf.function(jit_compile=args.xla)
    def run():
        return tfp.mcmc.sample_chain(args.results, init, kernel=kernel, num_burnin_steps=args.burnin,
                                     trace_fn=tfp_nvp.neutra_trace_fn, seed=seed)
    start = time.perf_counter()
    draws, trace = run()
    return draws, trace, time.perf_counter() - start


def plain_nuts(log_prob, event_space_bijector, init, args, seed):
    # The event-space bijector of an AutoBatched coroutine model maps a StructTuple: TFP treats it as list-like.
    kernel = tfp.mcmc.DualAveragingStepSizeAdaptation(
        tfp.mcmc.TransformedTransitionKernel(
            tfp.mcmc.NoUTurnSampler(log_prob, step_size=0.1, max_tree_depth=args.max_tree_depth),
            bijector=event_space_bijector),
        num_adaptation_steps=int(0.8 * args.burnin), target_accept_prob=0.8)
    return run_chain(kernel, init, args, seed)


def train(target_log_prob, surrogate, args, steps, seed):
    start = time.perf_counter()
    losses = tfp.vi.fit_surrogate_posterior(target_log_prob, surrogate, tf.keras.optimizers.Adam(args.lr),
                                            num_steps=steps, sample_size=args.sample_size, seed=seed,
                                            jit_compile=args.xla)
    return losses.numpy(), time.perf_counter() - start


def elbo(target_log_prob, surrogate, n, seed):
    draws = surrogate.sample(n, seed=seed)
    return float(tf.reduce_mean(target_log_prob(draws) - surrogate.log_prob(draws)))


def flow_surrogate(target, args, seed, pins=None):
    return tfp_nvp.surrogate_posterior(target, args.flow, pins=pins, seed=seed, flow_kwargs=dict(
        num_coupling_layers=args.couplings, hidden_units=(args.width,) * 2))


# ---------------------------------------------------------------------------------------------------- parts
def part_a(args):
    pinned = eight_schools_noncentred()
    esb = pinned.experimental_default_event_space_bijector()
    init = pinned.sample_unpinned(args.chains, seed=1)
    ref_args = argparse.Namespace(**{**vars(args), "burnin": args.ref_burnin, "results": args.ref_results})
    draws, trace, ref_time = plain_nuts(pinned.unnormalized_log_prob, esb, init, ref_args, seed=2)
    reference = schools_summary(draws)
    ref_diag = diagnostics(draws, trace)

    q = flow_surrogate(pinned, args, seed=3)
    flow_losses, flow_time = train(pinned.unnormalized_log_prob, q, args, args.vi_steps, seed=4)
    affine = tfp.experimental.vi.build_affine_surrogate_posterior(
        event_shape=pinned.event_shape, operators="tril", bijector=esb, seed=5)
    affine_losses, affine_time = train(pinned.unnormalized_log_prob, affine, args, args.vi_steps, seed=4)
    flow_summary = schools_summary(q.sample(args.eval_samples, seed=6))
    affine_summary = schools_summary(affine.sample(args.eval_samples, seed=6))

    def err(summary):
        """Largest |mean - reference mean| / reference sd over mu, tau and the thetas, and the same for sds."""
        pairs = [(summary["mu"], reference["mu"]), (summary["tau"], reference["tau"])]
        pairs += list(zip(summary["theta"], reference["theta"]))
        return (max(abs(s[0] - r[0]) / r[1] for s, r in pairs), max(abs(s[1] - r[1]) / r[1] for s, r in pairs))

    rows = {}
    for name, dist, summary, seconds in (("flow", q, flow_summary, flow_time),
                                         ("affine", affine, affine_summary, affine_time)):
        mean_err, sd_err = err(summary)
        rows[name] = {"elbo": elbo(pinned.unnormalized_log_prob, dist, args.eval_samples, seed=7),
                      "train_seconds": seconds, "mean_err_in_sd": mean_err, "sd_rel_err": sd_err,
                      "summary": summary,
                      "num_parameters": int(sum(np.prod(v.shape) for v in dist.trainable_variables))}
    return {"reference": {"summary": reference, "seconds": ref_time, **ref_diag}, **rows,
            "final_losses": {"flow": float(np.mean(flow_losses[-50:])), "affine": float(np.mean(affine_losses[-50:]))}}


def part_b(args, name, target, pins=None):
    log_prob = target.unnormalized_log_prob if pins is None else target.log_prob
    esb = target.experimental_default_event_space_bijector()
    init = target.sample_unpinned(args.chains, seed=11) if pins is None else target.sample(args.chains, seed=11)
    draws, trace, seconds = plain_nuts(log_prob, esb, init, args, seed=12)
    plain = {**diagnostics(draws, trace), "seconds": seconds}

    q = flow_surrogate(target, args, seed=13, pins=pins)
    _, train_seconds = train(log_prob, q, args, args.vi_steps, seed=14)
    kernel = tfp_nvp.neutra_kernel(log_prob if pins is not None else target, q, kernel="nuts", step_size=0.5,
                                   max_tree_depth=args.max_tree_depth, num_adaptation_steps=int(0.8 * args.burnin))
    draws, trace, seconds = run_chain(kernel, tfp_nvp.neutra_initial_state(q, args.chains, seed=15), args, seed=16)
    neutra = {**diagnostics(draws, trace), "seconds": seconds, "train_seconds": train_seconds,
              "train_grad_evals": args.vi_steps * args.sample_size}
    return {"plain_nuts": plain, "neutra": neutra}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run with small budgets")
    parser.add_argument("--flow", default="real_nvp")
    parser.add_argument("--couplings", type=int, default=6)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--vi-steps", type=int, default=3000)
    parser.add_argument("--sample-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--burnin", type=int, default=1000)
    parser.add_argument("--results", type=int, default=1000)
    parser.add_argument("--ref-burnin", type=int, default=2000)
    parser.add_argument("--ref-results", type=int, default=10000)
    parser.add_argument("--max-tree-depth", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=8192)
    parser.add_argument("--no-xla", dest="xla", action="store_false", help="tf.function without XLA")
    parser.add_argument("--only", nargs="+", default=["a", "funnel", "centred"], choices=["a", "funnel", "centred"])
    parser.add_argument("--json", default="benchmarks/probabilistic_programs.json")
    args = parser.parse_args()
    if args.quick:
        args.couplings, args.width, args.vi_steps, args.chains = 2, 16, 100, 2
        args.burnin, args.results, args.ref_burnin, args.ref_results = 50, 50, 100, 200
        args.max_tree_depth, args.eval_samples, args.lr = 5, 1024, 1e-2
    tf.random.set_seed(0)
    out = {"config": vars(args), "platform": platform.platform(), "tensorflow": tf.__version__,
           "tfp": tfp.__version__, "load_average_start": os.getloadavg()}
    start = time.perf_counter()
    if "a" in args.only:
        out["eight_schools_noncentred"] = part_a(args)
    if "funnel" in args.only:
        out["funnel_10d"] = part_b(args, "funnel", funnel(), pins={})
    if "centred" in args.only:
        out["eight_schools_centred"] = part_b(args, "centred", eight_schools_centred())
    out["load_average_end"] = os.getloadavg()
    out["wall_seconds"] = time.perf_counter() - start

    print(f"\n{'QUICK (smoke) run: ' if args.quick else ''}{args.flow}, {args.couplings} couplings x {args.width} "
          f"wide, {args.vi_steps} VI steps (Adam {args.lr}, {args.sample_size} draws/step); load average "
          f"{out['load_average_start'][0]:.1f} -> {out['load_average_end'][0]:.1f}\n")
    if "a" in args.only:
        a = out["eight_schools_noncentred"]
        print("### (a) Non-centred eight schools: surrogates vs NUTS reference "
              f"({args.chains} chains x {args.ref_results} draws, max R-hat {a['reference']['rhat_max']:.3f})\n")
        print("| surrogate | ELBO | max abs mean error / ref sd | max rel sd error | params | train s |")
        print("|---|---|---|---|---|---|")
        for name in ("flow", "affine"):
            r = a[name]
            print(f"| {name} | {r['elbo']:.3f} | {r['mean_err_in_sd']:.3f} | {r['sd_rel_err']:.3f} | "
                  f"{r['num_parameters']} | {r['train_seconds']:.1f} |")
        ref = a["reference"]["summary"]
        print(f"\nreference: mu {ref['mu'][0]:.2f} ± {ref['mu'][1]:.2f}, tau {ref['tau'][0]:.2f} ± "
              f"{ref['tau'][1]:.2f}; flow: mu {a['flow']['summary']['mu'][0]:.2f} ± "
              f"{a['flow']['summary']['mu'][1]:.2f}, tau {a['flow']['summary']['tau'][0]:.2f} ± "
              f"{a['flow']['summary']['tau'][1]:.2f}\n")
    for key, title, first in (("funnel_10d", "Neal's funnel (10-D)", "v"),
                              ("eight_schools_centred", "Centred eight schools", "mu")):
        if key not in out:
            continue
        print(f"### (b) {title}: NeuTra vs plain NUTS ({args.chains} chains, {args.burnin} burn-in, "
              f"{args.results} kept)\n")
        print(f"| sampler | min ESS | ESS({first}) | grad evals | min ESS / grad | ESS({first}) / grad | "
              "max R-hat | accept | sample s | VI grad evals |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in ("plain_nuts", "neutra"):
            r = out[key][name]
            print(f"| {name} | {r['ess_min']:.0f} | {r['ess_first_part']:.0f} | {r['grad_evals']} | "
                  f"{r['ess_min_per_grad']:.2e} | {r['ess_first_per_grad']:.2e} | {r['rhat_max']:.3f} | "
                  f"{r['accept']:.2f} | {r['seconds']:.1f} | {r.get('train_grad_evals', 0)} |")
        print()
    print(f"total wall time {out['wall_seconds']:.0f} s")
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
