"""The command line end to end, and its one-line errors on bad input."""

import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase import Atoms

from structrecon.cli import main
from structrecon.data import relaxed_clusters
from structrecon.fingerprints import read_fingerprints

FAST = ["--attempts", "6", "--hops", "3", "--steps", "100"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    frames = relaxed_clusters(3, n_atoms=5, seed=11)
    ase.io.write(d / "ref.extxyz", frames)
    return d


def run_cli(*argv, cwd=None):
    """Run ``python -m structrecon.cli`` in a subprocess: exit code, stdout, stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "structrecon.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(code, err, pattern):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_describe_invert_compare_round_trip(workdir, capsys):
    fp = workdir / "fp.npz"
    out = workdir / "out.extxyz"
    assert main(["describe", str(workdir / "ref.extxyz"), "-d", "acsf-fung", "-o", str(fp)]) == 0
    fps = read_fingerprints(fp)
    assert fps.fingerprints.shape == (3, 380)
    with np.load(fp) as data:
        assert not any("pos" in k for k in data.files)  # never the positions
        assert "prop_energy" in data.files
    assert main(["invert", str(fp), "-o", str(out), "--quiet", *FAST]) == 0
    frames = ase.io.read(out, ":")
    assert [a.info["name"] for a in frames] == fps.names
    for a in frames:
        assert {"loss", "fingerprint_rmsd", "converged", "seconds"} <= set(a.info)
        assert a.info["converged"] is True or a.info["converged"] is np.True_
    capsys.readouterr()
    assert (
        main(["compare", str(workdir / "ref.extxyz"), str(out), "--plot", str(workdir / "plots")])
        == 0
    )
    text = capsys.readouterr().out
    assert "recovered (RMSD < 0.05 A, mirror allowed): 3/3" in text
    assert (workdir / "plots" / "pair_distances.png").stat().st_size > 1000


def test_resume_keeps_written_results_and_finishes(workdir):
    fp = workdir / "fp_resume.npz"
    out = workdir / "out_resume.extxyz"
    main(["describe", str(workdir / "ref.extxyz"), "-d", "acsf-fung", "-o", str(fp)])
    # a run that was interrupted after its first target
    main(["invert", str(fp), "-o", str(out), "--quiet", "--batch", "1", *FAST])
    frames = ase.io.read(out, ":")
    ase.io.write(out, frames[:1])
    first = out.read_text()
    code, _, err = run_cli("invert", fp, "-o", out)
    one_line_error(code, err, "exists; pass --resume")
    assert out.read_text() == first  # nothing lost
    assert (
        main(["invert", str(fp), "-o", str(out), "--quiet", "--resume", "--batch", "1", *FAST]) == 0
    )
    text = out.read_text()
    assert text.startswith(first)
    assert len(ase.io.read(out, ":")) == 3


def test_seed_reproducible_through_cli(workdir):
    fp = workdir / "fp_seed.npz"
    main(["describe", str(workdir / "ref.extxyz"), "-d", "acsf-fung", "-o", str(fp)])
    outs = []
    for k in range(2):
        out = workdir / f"seed{k}.extxyz"
        main(
            [
                "invert",
                str(fp),
                "-o",
                str(out),
                "--quiet",
                "--seed",
                "3",
                "--attempts",
                "2",
                "--hops",
                "1",
                "--steps",
                "10",
            ]
        )
        outs.append(np.concatenate([a.positions for a in ase.io.read(out, ":")]))
    np.testing.assert_array_equal(*outs)


def test_bad_inputs_give_one_line_errors(workdir, tmp_path):
    ref = workdir / "ref.extxyz"
    fp = workdir / "fp_bad.npz"
    main(["describe", str(ref), "-d", "acsf-fung", "-o", str(fp)])

    code, _, err = run_cli(
        "describe", tmp_path / "missing.xyz", "-d", "acsf-fung", "-o", tmp_path / "x"
    )
    one_line_error(code, err, "does not exist")

    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    code, _, err = run_cli("describe", empty, "-d", "acsf-fung", "-o", tmp_path / "x")
    one_line_error(code, err, "is empty")

    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\na structure file\n")
    code, _, err = run_cli("describe", garbage, "-d", "acsf-fung", "-o", tmp_path / "x")
    one_line_error(code, err, "cannot read input file")

    code, _, err = run_cli("describe", ref, "-d", "acsf-nope", "-o", tmp_path / "x")
    one_line_error(code, err, "valid: acsf, acsf-fung")

    toml = tmp_path / "spec.toml"
    toml.write_text(
        '[descriptor]\nkind = "acsf"\ncutoff = 5.0\nspecies = [78]\ng2 = [[1.0, 2.0]]\nbogus = 1\n'
    )
    code, _, err = run_cli("describe", ref, "-d", toml, "-o", tmp_path / "x")
    one_line_error(
        code, err, "unknown 'acsf' descriptor option(s) bogus; valid: cutoff, g2, g4, g5, species"
    )

    code, _, err = run_cli("invert", fp, "-o", tmp_path / "o.extxyz", "--method", "magic")
    one_line_error(
        code, err, "unknown method 'magic'; valid: adam-hops, lbfgs, lm, milad, noisy-gd"
    )

    far = tmp_path / "far.xyz"
    ase.io.write(far, Atoms("Pt3", positions=[[0, 0, 0], [2.5, 0, 0], [40, 0, 0]]))
    code, _, err = run_cli("describe", far, "-d", "acsf-fung", "-o", tmp_path / "x")
    one_line_error(code, err, "outside the 20.0 A cutoff sphere")

    with np.load(fp) as data:
        arrays = {k: data[k] for k in data.files}

    def tampered(name, **changes):
        path = tmp_path / name
        np.savez(path, **{**arrays, **changes})
        return path

    code, _, err = run_cli(
        "invert",
        tampered("short.npz", fingerprints=arrays["fingerprints"][:, :100]),
        "-o",
        tmp_path / "o.extxyz",
    )
    one_line_error(
        code, err, "fingerprint length 100 does not match its spec 'acsf-fung' (380 values)"
    )

    bad = arrays["fingerprints"].copy()
    bad[1, 5] = np.nan
    code, _, err = run_cli(
        "invert", tampered("nan.npz", fingerprints=bad), "-o", tmp_path / "o.extxyz"
    )
    one_line_error(code, err, "contains NaN or inf")

    n_atoms = arrays["n_atoms"].copy()
    n_atoms[0] = 0
    n_atoms[1] += arrays["n_atoms"][0]
    code, _, err = run_cli(
        "invert", tampered("nocomp.npz", n_atoms=n_atoms), "-o", tmp_path / "o.extxyz"
    )
    one_line_error(code, err, "has no composition")

    code, _, err = run_cli("invert", ref, "-o", tmp_path / "o.extxyz")
    one_line_error(code, err, "is not a structrecon fingerprint file")

    start = tmp_path / "start.xyz"
    ase.io.write(start, Atoms("Pt2", positions=[[0, 0, 0], [2.5, 0, 0]]))
    code, _, err = run_cli("invert", fp, "-o", tmp_path / "o.extxyz", "--start", start)
    one_line_error(code, err, "start structure for")


def test_debug_shows_the_traceback(tmp_path):
    code, _, err = run_cli(
        "--debug", "describe", tmp_path / "missing.xyz", "-d", "acsf-fung", "-o", tmp_path / "x"
    )
    assert code != 0 and "Traceback" in err


def test_a_closed_pipe_ends_quietly(tmp_path):
    """'structrecon validate ... | head -1': the reader closes the pipe after one line of
    the per-structure table; the command stops with 141 (128 + SIGPIPE) and no
    'unexpected error' line."""
    ase.io.write(tmp_path / "a.xyz", [Atoms("Pt2", positions=[[0, 0, 0], [2.5, 0, 0]])] * 3000)
    argv = [sys.executable, "-m", "structrecon.cli", "validate", str(tmp_path / "a.xyz")]
    argv += ["--calculator", "emt", "--target", "1.0"]
    reader = "import sys; sys.stdin.readline()"  # one line, then exit: the pipe closes
    cmd = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    subprocess.run([sys.executable, "-c", reader], stdin=cmd.stdout, check=True)
    cmd.stdout.close()
    with cmd.stderr:
        err = cmd.stderr.read().decode()
    assert cmd.wait() == 141 and "error" not in err, err


def test_help_documents_every_command():
    for cmd in ["describe", "invert", "compare", "demo", "train", "generate", "screen", "validate"]:
        code, out, _ = run_cli(cmd, "--help")
        assert code == 0 and "usage: structrecon " + cmd in out


def test_describe_help_names_every_preset():
    from structrecon.descriptors import PRESETS

    code, out, _ = run_cli("describe", "--help")
    text = " ".join(out.split())  # argparse wraps the help text
    missing = [name for name in PRESETS if name not in text]
    assert code == 0 and not missing


def test_describe_warns_when_a_milad_structure_reaches_beyond_the_cutoff(tmp_path, capsys):
    """The milad preset's 5 A sphere: a chain 11.1 A long reaches beyond it (5.55 A from
    its centroid), a 4 A one does not (the control); the fingerprints are written
    either way."""
    long = Atoms("C4", positions=[[0, 0, 0], [3.7, 0, 0], [7.4, 0, 0], [11.1, 0, 0]])
    short = Atoms("C3", positions=[[0, 0, 0], [2.0, 0, 0], [4.0, 0, 0]])
    for frames, warned in (([short], False), ([short, long], True)):
        ase.io.write(tmp_path / "m.extxyz", frames)
        assert (
            main(["describe", str(tmp_path / "m.extxyz"), "-d", "milad", "-o", str(tmp_path / "m")])
            == 0
        )
        err = capsys.readouterr().err
        assert ("reach beyond the 5 A MILAD cutoff" in err) == warned, err
        assert len(read_fingerprints(tmp_path / "m.npz").names) == len(frames)
    assert "1 of 2 structure(s)" in err and "5.55 A" in err
