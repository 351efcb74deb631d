"""Generative models: cVAE and surrogate over fingerprints (Fung 2022, sec. 2.3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from structrecon._errors import StructreconError
from structrecon.cli import main
from structrecon.generative import (
    CVAE,
    CVAESpec,
    Surrogate,
    SurrogateSpec,
    TrainingData,
    load_model,
    load_training_data,
    split_indices,
    train,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pt10_structrepgen"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/pt10_structrepgen")
needs_data = pytest.mark.skipif(not (DATA / "x.csv").is_file(), reason="x.csv not available")


def synthetic(n=200, f=380, seed=0):
    """Fingerprints in the acsf-fung length; the property is a linear function of them."""
    from structrecon.descriptors import preset

    rng = np.random.default_rng(seed)
    y = rng.uniform(0.0, 1.0, n)
    basis = rng.normal(size=(2, f))
    X = np.outer(y, basis[0]) + 0.3 * np.outer(rng.normal(size=n), basis[1]) + 5.0
    X += 0.01 * rng.normal(size=X.shape)
    return TrainingData(
        X, y, "p", preset("acsf-fung"), np.full(10, 78), np.zeros((3, 3)), np.zeros(3, bool)
    )


@pytest.fixture(scope="module")
def pt10():
    return load_training_data(DATA / "x.csv", "e_form", y_csv=DATA / "y.csv")


def test_shapes():
    torch.manual_seed(0)
    cvae = CVAE(CVAESpec(n_features=380))
    x, y = torch.randn(7, 380), torch.randn(7, 1)
    x_hat, mu, logvar = cvae(x, y)
    assert x_hat.shape == (7, 380) and mu.shape == (7, 25) and logvar.shape == (7, 25)
    assert cvae.sample(y).shape == (7, 380)
    # paper: three hidden layers of 128 in encoder and decoder
    linears = [m for m in cvae.encoder if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [128, 128, 128, 50]
    sur = Surrogate(SurrogateSpec(n_features=380))
    linears = [m for m in sur.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5 and linears[0].out_features == 256
    assert sur(x).shape == (7,)


def test_normaliser_keeps_near_constant_columns_near_constant():
    """What one model decodes for a (nearly) constant column stays in range for a model
    whose statistics come from other data (the Pt10 min-pooled ACSF columns vary by
    1e-13; with a floor of 1 on the first model's scale, the second saw 1e7 sigmas)."""
    from structrecon.generative.models import Normaliser

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    X[:, 2] = 0.0  # constant on the first half ...
    X[100:, 2] = 1e-7 * rng.normal(size=100)  # ... tiny spread on the second
    X[:, 3] = 7.0
    prop = rng.normal(size=200)
    a, b = Normaliser.fit(X[:100], prop[:100]), Normaliser.fit(X, prop)
    np.testing.assert_allclose(b.x_inverse(b.x(X)), X, atol=1e-12)
    assert np.abs(b.x(X)).max() < 10  # the data themselves stay O(1)
    decoded = a.x_inverse(rng.normal(size=(50, 4)))  # a model's output mapped to R
    assert np.abs(decoded[:, 2]).max() < 1e-4 and np.allclose(decoded[:, 3], 7.0, atol=1e-4)
    assert np.abs(b.x(decoded)).max() < 20
    # negative control: with the old floor of 1 for column 2 the second model is far off
    loose = Normaliser(a.x_mean, np.where(np.arange(4) == 2, 1.0, a.x_std), a.y_mean, a.y_std)
    assert np.abs(b.x(loose.x_inverse(rng.normal(size=(50, 4))))).max() > 1e3


def test_spec_validation():
    with pytest.raises(StructreconError, match="valid: .*beta"):
        CVAESpec.from_dict({"n_features": 10, "betta": 1.0})
    with pytest.raises(StructreconError, match="latent"):
        CVAESpec(n_features=10, latent=0)
    with pytest.raises(StructreconError, match="activation"):
        SurrogateSpec(n_features=10, activation="gelu2")
    spec = CVAESpec(n_features=10)
    assert CVAESpec.from_dict(spec.to_dict()) == spec
    assert (spec.hidden, spec.layers, spec.latent, spec.beta, spec.lr, spec.batch_size) == (
        128,
        3,
        25,
        0.75,
        1e-3,
        64,
    )
    with pytest.raises(Exception):
        spec.beta = 1.0  # frozen


def test_conditional_prior_kl_and_sampling():
    """The KL term against torch.distributions, for both priors; sampling draws from them."""
    from torch.distributions import Normal, kl_divergence

    torch.manual_seed(0)
    x, y = torch.randn(9, 380, dtype=torch.float64), torch.randn(9, 1, dtype=torch.float64)
    for prior in ("standard", "conditional"):
        cvae = CVAE(CVAESpec(n_features=380, prior=prior)).double()
        mu, logvar = cvae.encode(x, y)
        mu_p, logvar_p = cvae.prior(y)
        ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(mu_p, (0.5 * logvar_p).exp()))
        _, kl = cvae.loss(x, y)
        torch.testing.assert_close(kl, ref.sum(dim=1).mean())
        # sampling: z = mu_p + T sigma_p eps, decoded with the same eps
        eps = torch.randn(9, 25, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        z = mu_p + 0.7 * (0.5 * logvar_p).exp() * eps
        got = cvae.sample(y, torch.Generator().manual_seed(4), temperature=0.7)
        torch.testing.assert_close(got, cvae.decode(z, y))
        if prior == "standard":  # N(0, I) whatever y
            assert not mu_p.any() and not logvar_p.any()
            assert not hasattr(cvae, "prior_net")
        else:  # the prior moves with the condition
            assert (mu_p[0] - mu_p[1]).abs().max() > 1e-6
            names = [k for k in cvae.state_dict() if k.startswith("prior_net.")]
            assert names
    with pytest.raises(StructreconError, match="unknown prior 'flat'; valid: standard"):
        CVAESpec(n_features=10, prior="flat")
    assert CVAESpec(n_features=10).prior == "standard"  # the paper's


def test_split_is_80_20_and_seeded():
    tr, va = split_indices(300, 0.8, 3)
    assert len(tr) == 240 and len(va) == 60 and not set(tr) & set(va)
    assert np.array_equal(tr, split_indices(300, 0.8, 3)[0])
    assert not np.array_equal(tr, split_indices(300, 0.8, 4)[0])


def test_split_seed_keeps_the_split_and_changes_the_initialisation():
    data = synthetic(64)
    spec = CVAESpec(n_features=380, epochs=1)
    a = train(data, spec, seed=0, progress=False)
    b = train(data, spec, seed=5, split_seed=0, progress=False)
    c = train(data, spec, seed=5, progress=False)
    # the normalisation statistics come from the training part: same split, same statistics
    np.testing.assert_array_equal(a.normaliser.x_mean, b.normaliser.x_mean)
    assert not np.allclose(a.normaliser.x_mean, c.normaliser.x_mean)  # another split
    wa, wb = a.model.decoder[0].weight, b.model.decoder[0].weight
    assert not torch.allclose(wa, wb)  # another initialisation
    assert b.info["split_seed"] == 0 and b.info["seed"] == 5


def test_save_load_round_trip(tmp_path):
    data = synthetic(64)
    for spec in (
        CVAESpec(n_features=380, epochs=2),
        CVAESpec(n_features=380, epochs=2, prior="conditional"),
        SurrogateSpec(n_features=380, epochs=2),
    ):
        model = train(data, spec, seed=1, progress=False)
        d = model.save(tmp_path / f"{spec.kind}_{getattr(spec, 'prior', '')}")
        assert (d / "loss.png").stat().st_size > 0
        meta = json.loads((d / "spec.json").read_text())
        assert meta["numbers"] == [78] * 10 and meta["fingerprint_spec"]["name"] == "acsf-fung"
        state = torch.load(d / "model.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        back = load_model(d, spec.kind)
        assert back.model.spec == model.model.spec
        if spec.kind == "cvae":
            a, b = model.generate(2.0, 5, seed=3), back.generate(2.0, 5, seed=3)
            assert a.shape == (5, 380)
        else:
            a, b = model.predict(data.fingerprints), back.predict(data.fingerprints)
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StructreconError, match="holds a cvae model"):
        load_model(tmp_path / "cvae_standard", "surrogate")


def test_posterior_sampling_draws_training_latents_near_the_target(tmp_path):
    data = synthetic(64)
    cvae = train(data, CVAESpec(n_features=380, epochs=5), seed=0, progress=False)
    post = cvae.posterior
    tr, _ = split_indices(64, 0.8, 0)
    assert post["mu"].shape == (len(tr), 25) and post["logvar"].shape == (len(tr), 25)
    np.testing.assert_allclose(cvae.normaliser.y_inverse(post["y"]), data.prop[tr], atol=1e-6)
    # a bandwidth far below the gaps between the training properties picks one structure;
    # at a tiny temperature its z is its posterior mean
    i = 7
    target = float(data.prop[tr][i])
    got = cvae.generate(target, 5, seed=0, temperature=1e-6, latent="posterior", bandwidth=1e-9)
    z = torch.as_tensor(post["mu"][i : i + 1], dtype=torch.float32)
    yn = torch.full((1, 1), float(cvae.normaliser.y(target)))
    with torch.no_grad():
        want = cvae.normaliser.x_inverse(cvae.model.decode(z, yn).double().numpy())
    np.testing.assert_allclose(got, np.repeat(want, 5, axis=0), rtol=1e-5, atol=1e-5)
    prior = cvae.generate(target, 5, seed=0, temperature=1e-6)  # negative control
    assert np.abs(prior - want).max() > 1e-3
    # with the default bandwidth, the samples spread over several structures near the target
    wide = cvae.generate(target, 50, seed=0, temperature=1e-6, latent="posterior")
    assert len(np.unique(wide.round(6), axis=0)) > 1
    with pytest.raises(StructreconError, match="more than 4 bandwidths"):
        cvae.generate(5.0, 5, latent="posterior")
    with pytest.raises(StructreconError, match="latent must be"):
        cvae.generate(target, 5, latent="aggregate")
    with pytest.raises(StructreconError, match="bandwidth applies to latent='posterior' only"):
        cvae.generate(target, 5, latent="prior", bandwidth=0.05)
    d = cvae.save(tmp_path / "c")
    back = load_model(d, "cvae")
    again = back.generate(target, 5, seed=0, temperature=1e-6, latent="posterior", bandwidth=1e-9)
    np.testing.assert_array_equal(got, again)
    (d / "posterior.npz").unlink()
    old = load_model(d, "cvae")
    with pytest.raises(StructreconError, match="no stored posterior"):
        old.generate(target, 5, latent="posterior")
    cvae.save(tmp_path / "other")
    old.save(tmp_path / "other")  # over another model's directory: its posterior goes
    assert not (tmp_path / "other" / "posterior.npz").exists()
    assert train(data, SurrogateSpec(n_features=380, epochs=1), progress=False).posterior is None


def test_training_reduces_losses():
    data = synthetic(200)
    for prior in ("standard", "conditional"):
        spec = CVAESpec(n_features=380, epochs=30, prior=prior)
        cvae = train(data, spec, seed=0, progress=False)
        h = cvae.history
        assert h["train"][-1] < 0.5 * h["train"][0] and h["validation"][-1] < h["validation"][0]


def test_learning_rate_decays_to_the_given_factor():
    data = synthetic(60)
    for decay in (0.2, 1.0):  # 1.0: the control, a constant rate
        spec = SurrogateSpec(n_features=380, epochs=7, lr=1e-3, lr_decay=decay)
        sur = train(data, spec, seed=0, progress=False)
        assert sur.info["final_lr"] == pytest.approx(1e-3 * decay, rel=1e-9)
    with pytest.raises(StructreconError, match="lr_decay"):
        SurrogateSpec(n_features=380, lr_decay=1.5)
    with pytest.raises(StructreconError, match="validation"):
        CVAESpec(n_features=380, keep_best=True, train_fraction=1.0)


def test_keep_best_ends_at_the_epoch_of_lowest_validation_loss():
    """A surrogate that overfits 20 noisy points: the last epoch is not the best one."""
    rng = np.random.default_rng(3)
    data = synthetic(25)
    data.prop[:] = rng.normal(size=25)  # no relation to the fingerprints
    _, va = split_indices(25, 0.8, 0)

    def validation_mse(model):  # as history["validation"]: on the normalised property
        norm = model.normaliser
        pred = model.predict(data.fingerprints[va])
        return float(((norm.y(pred) - norm.y(data.prop[va])) ** 2).mean())

    kept = {}
    for keep in (True, False):  # False: the control, the last epoch's weights
        spec = SurrogateSpec(n_features=380, epochs=40, lr=1e-3, keep_best=keep)
        kept[keep] = train(data, spec, seed=0, progress=False)
    best = kept[True].info["best_epoch"]
    hist = kept[True].history["validation"]
    assert best == int(np.argmin(hist)) and best != len(hist) - 1
    assert validation_mse(kept[True]) == pytest.approx(min(hist), rel=1e-4)
    last = kept[False].history["validation"]
    assert validation_mse(kept[False]) == pytest.approx(last[-1], rel=1e-4)
    assert validation_mse(kept[False]) > 1.01 * validation_mse(kept[True])


def test_surrogate_learns_linear_function():
    data = synthetic(200)
    sur = train(data, SurrogateSpec(n_features=380, epochs=150), seed=0, progress=False)
    _, va = split_indices(200, 0.8, 0)
    err = np.abs(sur.predict(data.fingerprints[va]) - data.prop[va])
    # y spans [0, 1]; predicting the mean would give MAE ~0.25
    assert err.mean() < 0.05


@needs_data
def test_conditioning_moves_surrogate_prediction(pt10):
    sur = train(pt10, SurrogateSpec(n_features=380, epochs=150), seed=0, progress=False)
    cvae = train(pt10, CVAESpec(n_features=380, epochs=150, beta=20.0), seed=0, progress=False)
    low = sur.predict(cvae.generate(2.2, 500, seed=1))
    high = sur.predict(cvae.generate(3.4, 500, seed=1))
    assert np.median(high) - np.median(low) > 0.6  # targets are 1.2 eV/atom apart
    assert abs(np.median(low) - 2.2) < 0.3 and abs(np.median(high) - 3.4) < 0.3
    # generated samples are diverse, not one decoded point
    assert cvae.generate(2.8, 50, seed=2).std(axis=0).max() > 0
    # a lower temperature draws z nearer the centre: less spread; T = 1 is the default
    cold = cvae.generate(2.8, 500, seed=2, temperature=0.3).std(axis=0).mean()
    warm = cvae.generate(2.8, 500, seed=2, temperature=1.0).std(axis=0).mean()
    assert cold < 0.8 * warm
    np.testing.assert_allclose(
        cvae.generate(2.8, 5, seed=2, temperature=1.0), cvae.generate(2.8, 5, seed=2)
    )
    with pytest.raises(StructreconError, match="temperature must be > 0"):
        cvae.generate(2.8, 5, temperature=0.0)


def test_calibrate_takes_out_a_known_offset():
    """A surrogate that reads every property 0.3 too high: calibration must decode at
    the target - 0.3, where that surrogate's mean comes back to the target."""
    import dataclasses

    data = synthetic(300)
    shifted = dataclasses.replace(data, prop=data.prop + 0.3)
    cvae = train(data, CVAESpec(n_features=380, epochs=150, beta=1.0), seed=0, progress=False)
    sur = train(shifted, SurrogateSpec(n_features=380, epochs=150), seed=0, progress=False)
    raw = sur.predict(cvae.generate(0.8, 2000, seed=1)).mean()
    assert abs(raw - 1.1) < 0.1  # the control: uncalibrated, the offset is there
    c, info = cvae.calibrate(0.8, sur, n=2000, seed=1)
    assert abs(c - 0.5) < 0.05 and abs(info["offset"] + 0.3) < 0.05
    assert info["converged"] and abs(info["mean"] - 0.8) <= 0.01 * cvae.normaliser.y_std
    assert info["steps"][0] == (0.8, pytest.approx(raw))  # it starts at the target
    # fresh samples at c, another seed, land on the target too
    assert abs(sur.predict(cvae.generate(c, 2000, seed=5)).mean() - 0.8) < 0.02
    # one step only: c stays at the target, not converged
    c1, info1 = cvae.calibrate(0.8, sur, n=2000, seed=1, max_steps=1)
    assert c1 == 0.8 and not info1["converged"]
    # a committee with a surrogate that reads the property as it is: half the offset
    plain = train(data, SurrogateSpec(n_features=380, epochs=150), seed=0, progress=False)
    c2, info2 = cvae.calibrate(0.8, [sur, plain], n=2000, seed=1)
    assert abs(c2 - 0.65) < 0.05 and info2["converged"]
    with pytest.raises(StructreconError, match="at least one surrogate"):
        cvae.calibrate(0.8, [])
    with pytest.raises(StructreconError, match="not a cVAE"):
        sur.calibrate(0.8, sur)
    with pytest.raises(StructreconError, match="needs a surrogate"):
        cvae.calibrate(0.8, cvae)
    with pytest.raises(StructreconError, match="tol must be > 0"):
        cvae.calibrate(0.8, sur, tol=0.0)


def test_calibrate_min_share_cools_until_the_surrogate_agrees():
    """The surrogate reads a latent direction the condition does not fix (property + 0.3
    x the second component of the data), so at T = 1 the samples at one condition spread
    wider than the window; min_share must lower the temperature until they do not."""
    import dataclasses

    data = synthetic(300)
    rng = np.random.default_rng(0)  # synthetic()'s draws, in its order: y, basis, noise
    rng.uniform(0.0, 1.0, 300), rng.normal(size=(2, 380))
    wide = dataclasses.replace(data, prop=data.prop + 0.3 * rng.normal(size=300))
    cvae = train(data, CVAESpec(n_features=380, epochs=150, beta=1.0), seed=0, progress=False)
    sur = train(wide, SurrogateSpec(n_features=380, epochs=150), seed=0, progress=False)

    def share(c, t):
        pred = sur.predict(cvae.generate(c, 2000, seed=5, temperature=t))
        return (np.abs(pred - 0.5) <= 0.1).mean()

    c0, info0 = cvae.calibrate(0.5, sur, n=2000, seed=1)  # the mean only
    assert info0["temperature"] == 1.0 and len(info0["rungs"]) == 1
    assert share(c0, 1.0) < 0.7  # the control: calibrated mean, but too wide at T = 1
    c, info = cvae.calibrate(0.5, sur, n=2000, seed=1, min_share=0.9, window=0.1)
    temps = [r[0] for r in info["rungs"]]
    assert info["temperature"] == temps[-1] < 1.0 and info["share"] >= 0.9
    np.testing.assert_allclose(temps, 0.8 ** np.arange(len(temps)))
    assert all(r[2] < 0.9 for r in info["rungs"][:-1])  # colder only while short
    assert share(c, info["temperature"]) >= 0.88  # fresh samples agree
    assert abs(info["mean"] - 0.5) <= 0.01 * cvae.normaliser.y_std
    # a floor above what is needed: the best rung is kept, reported as short
    c2, info2 = cvae.calibrate(0.5, sur, n=500, seed=1, min_share=0.9, min_temperature=0.7)
    assert [r[0] for r in info2["rungs"]] == [1.0, 0.8] and info2["share"] < 0.9
    for bad, match in (
        ({"min_share": 1.5}, "min_share must be a fraction"),
        ({"min_share": 0.9, "window": 0.0}, "window must be > 0"),
        ({"min_share": 0.9, "cooling": 1.0}, "cooling must lie in"),
        ({"min_share": 0.9, "min_temperature": 2.0}, "min_temperature must lie in"),
    ):
        with pytest.raises(StructreconError, match=match):
            cvae.calibrate(0.5, sur, **bad)


@needs_data
def test_cli_train_generate(tmp_path, capsys):
    x, y = str(DATA / "x.csv"), str(DATA / "y.csv")
    assert (
        main(
            [
                "train",
                "cvae",
                "--data",
                x,
                "--y-csv",
                y,
                "--property",
                "e_form",
                "-o",
                str(tmp_path / "c"),
                "--epochs",
                "2",
                "--prior",
                "conditional",
                "--no-progress",
            ]
        )
        == 0
    )
    spec = json.loads((tmp_path / "c" / "spec.json").read_text())
    assert spec["model"]["prior"] == "conditional"
    assert (
        main(
            [
                "train",
                "surrogate",
                "--data",
                x,
                "--y-csv",
                y,
                "--property",
                "e_form",
                "-o",
                str(tmp_path / "s"),
                "--epochs",
                "2",
                "--lr-decay",
                "0.5",
                "--keep-best",
                "--no-progress",
            ]
        )
        == 0
    )
    spec = json.loads((tmp_path / "s" / "spec.json").read_text())
    assert (spec["model"]["lr_decay"], spec["model"]["keep_best"]) == (0.5, True)
    assert "kept epoch" in capsys.readouterr().out
    out = tmp_path / "gen.npz"
    assert (
        main(
            [
                "generate",
                str(tmp_path / "c"),
                "--target",
                "2.5",
                "-n",
                "4",
                "-o",
                str(out),
                "--surrogate",
                str(tmp_path / "s"),
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert "surrogate: MAE" in capsys.readouterr().out
    from structrecon.fingerprints import read_fingerprints

    fset = read_fingerprints(out)
    assert fset.names == [f"gen_2.5_{k}" for k in range(4)]
    assert fset.fingerprints.shape == (4, 380) and np.all(fset.properties["target"] == 2.5)
    assert all(np.array_equal(n, [78] * 10) for n in fset.numbers)
    cal = tmp_path / "cal.npz"
    argv = ["generate", str(tmp_path / "c"), "--target", "2.5", "-n", "4", "-o", str(cal)]
    assert main(argv + ["--calibrate", str(tmp_path / "s"), "--calibration-samples", "50"]) == 0
    assert "calibrated: condition" in capsys.readouterr().out
    props = read_fingerprints(cal).properties
    assert np.all(props["target"] == 2.5) and np.all(props["condition"] == props["condition"][0])
    assert main(argv + ["--calibrate", str(tmp_path / "c")]) == 1  # a cVAE is no surrogate
    assert main(argv + ["--calibrate", str(tmp_path / "s"), "--calibration-samples", "0"]) == 1
    assert "--calibration-samples must be >= 1" in capsys.readouterr().err
    cold = ["--calibrate", str(tmp_path / "s"), "--calibration-samples", "50"]
    assert main(argv + cold + ["--min-share", "1.0", "--window", "1e-6"]) == 0
    out_ = capsys.readouterr().out  # nothing lands within 1e-6: every rung down to 0.1
    assert "not reached, the best kept" in out_ and "temperature 1:" in out_
    # every rung at a share of 0: the warmest is kept, and written with the samples
    assert np.all(read_fingerprints(cal).properties["temperature"] == 1.0)
    assert main(argv + ["--min-share", "0.9"]) == 1  # no calibrating surrogate
    assert "--min-share needs --calibrate" in capsys.readouterr().err
    assert main(argv + cold + ["--min-share", "90"]) == 1  # a fraction, not percent
    two = ["--calibrate", str(tmp_path / "s"), str(tmp_path / "s"), "--calibration-samples", "50"]
    assert main(argv + two) == 0  # a committee (here twice the same surrogate)
    assert read_fingerprints(cal).properties["condition"][0] == props["condition"][0]
    assert "min_share must be a fraction" in capsys.readouterr().err
    post = tmp_path / "post.npz"
    args = ["generate", str(tmp_path / "c"), "--target", "2.5", "-n", "3", "-o", str(post)]
    assert main(args + ["--latent", "posterior", "--bandwidth", "0.1"]) == 0
    assert read_fingerprints(post).fingerprints.shape == (3, 380)
    assert main(args + ["--bandwidth", "0.1"]) == 1  # the prior has no bandwidth
    assert "bandwidth applies to latent='posterior' only" in capsys.readouterr().err


def test_structures_db_train_and_validate(tmp_path, capsys):
    import ase.db
    import ase.io

    from structrecon.data.pt_dataset import build_pt_dataset, formation_energies

    db = tmp_path / "pt.db"
    n = build_pt_dataset(db, 2, every=10, max_steps=30, seed=0, progress=False)
    with ase.db.connect(str(db)) as con:
        rows = list(con.select())
    assert len(rows) == n >= 4
    assert sum(r.minimum for r in rows) == 2
    e = np.array([r.e_form for r in rows])
    np.testing.assert_allclose(formation_energies([r.toatoms() for r in rows]), e, atol=1e-9)
    assert (
        main(
            [
                "train",
                "surrogate",
                "--data",
                str(db),
                "--property",
                "e_form",
                "-o",
                str(tmp_path / "s"),
                "--epochs",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    ase.io.write(tmp_path / "s.extxyz", [r.toatoms() for r in rows[:2]])
    capsys.readouterr()
    assert (
        main(
            [
                "validate",
                str(tmp_path / "s.extxyz"),
                "--calculator",
                "emt",
                "--target",
                f"{e[0]:.6f}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "within +-0.1" in out and len(out.strip().splitlines()) == 3


def test_bulk_energy_and_fps():
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from structrecon.data.pt_dataset import bulk_energy, furthest_point_sampling

    e = bulk_energy("Pt", "emt")
    for a in (3.85, 3.95, 4.05):  # the optimum is lower than any scanned lattice constant
        atoms = bulk("Pt", "fcc", a=a)
        atoms.calc = EMT()
        assert e <= atoms.get_potential_energy() / len(atoms) + 1e-9
    X = np.array([[0.0, 0], [0.1, 0], [10, 0], [0, 10], [0.05, 0.05]])
    idx = furthest_point_sampling(X, 3, start=0)
    assert list(idx) == [0, 2, 3] or list(idx) == [0, 3, 2]


def _fails(argv, capsys, *fragments):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@needs_data
def test_cli_errors(tmp_path, capsys):
    x, y = str(DATA / "x.csv"), str(DATA / "y.csv")
    _fails(
        [
            "train",
            "cvae",
            "--data",
            str(tmp_path / "nope.db"),
            "--property",
            "e",
            "-o",
            str(tmp_path / "m"),
        ],
        capsys,
        "does not exist",
    )
    _fails(
        ["train", "cvae", "--data", x, "--property", "e", "-o", str(tmp_path / "m")],
        capsys,
        "--y-csv",
    )
    for flag, value in (("--prior", "conditional"), ("--beta", "2")):
        _fails(
            ["train", "surrogate", "--data", x, "--y-csv", y, "--property", "e", flag, value]
            + ["-o", str(tmp_path / "m")],
            capsys,
            f"{flag} is for 'train cvae'",
        )
    _fails(
        ["generate", str(tmp_path), "--target", "2", "-n", "3", "-o", str(tmp_path / "g.npz")],
        capsys,
        "not a structrecon model directory",
    )
    _fails(
        [
            "generate",
            str(tmp_path / "missing"),
            "--target",
            "2",
            "-n",
            "3",
            "-o",
            str(tmp_path / "g.npz"),
        ],
        capsys,
        "does not exist",
    )
    # unknown property key in a fingerprint file
    from structrecon.descriptors import preset
    from structrecon.fingerprints import FingerprintSet, write_fingerprints

    X = np.loadtxt(x, delimiter=",")[:5]
    fset = FingerprintSet(
        preset("acsf-fung"),
        [str(k) for k in range(5)],
        [np.full(10, 78)] * 5,
        np.zeros((5, 3, 3)),
        np.zeros((5, 3), bool),
        X,
        {"e_form": np.arange(5.0)},
    )
    write_fingerprints(tmp_path / "fp.npz", fset)
    _fails(
        [
            "train",
            "cvae",
            "--data",
            str(tmp_path / "fp.npz"),
            "--property",
            "energy",
            "-o",
            str(tmp_path / "m"),
        ],
        capsys,
        "'energy'",
        "available: e_form",
    )
    _fails(
        [
            "train",
            "surrogate",
            "--data",
            x,
            "--y-csv",
            y,
            "--property",
            "e",
            "-o",
            str(tmp_path / "m"),
            "--epochs",
            "0",
        ],
        capsys,
        "epochs",
    )
    _fails(["validate", x, "--calculator", "dft", "--target", "2"], capsys)
    import importlib.util

    if importlib.util.find_spec("tblite") is None:
        ase_file = tmp_path / "one.extxyz"
        import ase.io

        from structrecon.data.clusters import random_cluster

        ase.io.write(ase_file, random_cluster("Pt", 10, np.random.default_rng(0)))
        _fails(
            ["validate", str(ase_file), "--calculator", "gfn2", "--target", "2"], capsys, "tblite"
        )


def test_screen_keeps_what_the_surrogate_and_the_fingerprint_rmsd_allow(tmp_path, capsys):
    import ase.io

    from structrecon.data import relaxed_clusters
    from structrecon.descriptors import describe

    sur = train(synthetic(60), SurrogateSpec(n_features=380, epochs=3), seed=0, progress=False)
    sur.save(tmp_path / "sur")
    frames = relaxed_clusters(6, n_atoms=10, seed=1)
    pred = sur.predict(describe("acsf-fung", frames))
    for k, atoms in enumerate(frames):
        atoms.info.update(name=f"s{k}", fingerprint_rmsd=[1e-3, 0.2][k % 2])
    far = frames[5]
    far.positions[0] += [50.0, 0.0, 0.0]  # out of every other atom's 20 A cutoff
    rec = tmp_path / "rec.extxyz"
    ase.io.write(rec, frames)
    target, window = float(np.median(pred[:5])), float(np.ptp(pred[:5])) / 4
    expect = {f"s{k}" for k in range(5) if abs(pred[k] - target) <= window}
    assert 0 < len(expect) < 5  # the screen has something to keep and something to flag
    argv = ["screen", str(rec), "--surrogate", str(tmp_path / "sur"), "--target", str(target)]
    kept = tmp_path / "kept.extxyz"
    assert main([*argv, "--window", str(window), "-o", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "beyond the 20 A cutoff" in out.splitlines()[5]
    names = {a.info["name"] for a in ase.io.read(kept, ":")}
    assert names == expect
    for atoms in ase.io.read(kept, ":"):
        k = int(atoms.info["name"][1:])
        assert abs(atoms.info["predicted_p"] - pred[k]) < 1e-6
    # both screens: the odd frames' reconstructions stayed at fingerprint RMSD 0.2
    assert (
        main(
            [
                *argv,
                "--window",
                str(window),
                "--max-fp-rmsd",
                "0.01",
                "-o",
                str(kept),
                "--overwrite",
            ]
        )
        == 0
    )
    assert {a.info["name"] for a in ase.io.read(kept, ":")} == {
        n for n in expect if int(n[1:]) % 2 == 0
    }
    capsys.readouterr()
    # errors: one line, non-zero, the kept file untouched
    before = kept.read_text()
    _fails(["screen", str(rec)], capsys, "nothing to screen by")
    _fails(argv[:4], capsys, "--surrogate needs --target")
    _fails([*argv, "-o", str(kept)], capsys, "exists; pass --overwrite")
    _fails([*argv, "--window", "0"], capsys, "--window must be positive")
    pair = frames[0][:2]
    pair.info = {}
    ase.io.write(tmp_path / "h2.extxyz", pair)
    _fails(
        ["screen", str(tmp_path / "h2.extxyz"), "--max-fp-rmsd", "1"], capsys, "no fingerprint_rmsd"
    )
    _fails(
        ["screen", str(tmp_path / "h2.extxyz"), *argv[2:]],
        capsys,
        "not the surrogate's composition",
    )
    assert kept.read_text() == before


def test_per_atom_surrogate_learns_emt_and_screens(tmp_path, capsys):
    import ase.db
    import ase.io

    from structrecon.data.pt_dataset import build_pt_dataset, formation_energies

    db = tmp_path / "pt.db"
    build_pt_dataset(db, 6, every=2, max_steps=40, seed=1, progress=False)
    with ase.db.connect(str(db)) as con:
        frames = [r.toatoms() for r in con.select()]
    e = formation_energies(frames)
    assert len(frames) >= 40 and e.std() > 0.05
    out = {}
    for kind, extra in (("atoms", ["--per-atom"]), ("pooled", [])):
        argv = ["train", "surrogate", "--data", str(db), "--property", "e_form"]
        assert main([*argv, "-o", str(tmp_path / kind), "--no-progress", *extra]) == 0
        out[kind] = load_model(tmp_path / kind, "surrogate")
    atoms_model, pooled = out["atoms"], out["pooled"]
    assert atoms_model.per_atom and not pooled.per_atom
    assert json.loads((tmp_path / "atoms" / "spec.json").read_text())["model"]["per_atom"]
    pred = atoms_model.predict_structures(frames)
    # it learns EMT's formation energy far better than predicting the mean, and better
    # than the paper's MLP on the pooled fingerprint trained on the same frames
    mae = np.abs(pred - e).mean()
    assert mae < 0.25 * np.abs(e - e.mean()).mean()
    assert mae < np.abs(pooled.predict_structures(frames) - e).mean()
    # invariant to the order of the atoms, to rotations and translations; not to a distortion
    rng = np.random.default_rng(0)
    moved = []
    for atoms in frames[:5]:
        a = atoms[rng.permutation(len(atoms))]
        a.rotate(37.0, (1.0, 2.0, 0.5), center="COM")
        a.translate((0.3, -1.0, 2.0))
        moved.append(a)
    np.testing.assert_allclose(atoms_model.predict_structures(moved), pred[:5], atol=1e-5)
    bent = [a.copy() for a in frames[:5]]
    for a in bent:
        a.positions[0] += (0.4, 0.0, 0.0)
    assert np.abs(atoms_model.predict_structures(bent) - pred[:5]).min() > 1e-3
    # the screen uses the per-atom features of each structure
    for k, atoms in enumerate(frames):
        atoms.info = {"name": f"s{k}"}
    rec = tmp_path / "rec.extxyz"
    ase.io.write(rec, frames)
    target, window = float(np.median(pred)), 0.05
    kept = tmp_path / "kept.extxyz"
    argv = ["screen", str(rec), "--surrogate", str(tmp_path / "atoms"), "--target", str(target)]
    assert main([*argv, "--window", str(window), "-o", str(kept)]) == 0
    expect = {f"s{k}" for k in range(len(frames)) if abs(pred[k] - target) <= window}
    assert 0 < len(expect) < len(frames)
    assert {a.info["name"] for a in ase.io.read(kept, ":")} == expect
    capsys.readouterr()
    # errors: one line, non-zero
    _fails(
        ["train", "cvae", "--data", str(db), "--property", "e_form", "-o", str(tmp_path / "c")]
        + ["--per-atom"],
        capsys,
        "--per-atom is for 'train surrogate'",
    )
    cvae = ["train", "cvae", "--data", str(db), "--property", "e_form", "--epochs", "2"]
    assert main([*cvae, "-o", str(tmp_path / "cv"), "--no-progress"]) == 0
    capsys.readouterr()
    _fails(
        ["generate", str(tmp_path / "cv"), "--target", "1", "-n", "2", "-o", str(tmp_path / "g")]
        + ["--surrogate", str(tmp_path / "atoms")],
        capsys,
        "is a per-atom surrogate: it scores structures",
    )
    csv = tmp_path / "x.csv"
    np.savetxt(csv, np.ones((3, 380)), delimiter=",")
    _fails(
        ["train", "surrogate", "--data", str(csv), "--property", "e_form", "--per-atom"]
        + ["--y-csv", str(csv), "-o", str(tmp_path / "c")],
        capsys,
        "a per-atom surrogate needs structures",
    )
