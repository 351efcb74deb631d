"""Recover a Pt10 cluster from its ACSF fingerprint (Fung 2022) with the Python API.

Run: ``OMP_NUM_THREADS=1 python examples/01_invert_pt10.py`` (about 30 s).
"""

import torch

from structrecon.data import relaxed_clusters
from structrecon.descriptors import describe
from structrecon.evaluate import align
from structrecon.inversion import AdamHops, Target, invert

torch.set_num_threads(1)

cluster = relaxed_clusters(1, seed=42)[0]  # a local minimum of EMT
fingerprint = describe("acsf-fung", [cluster])[0]  # 380 values, no positions
target = Target(name="pt10", numbers=cluster.numbers, fingerprint=fingerprint)
result = invert([target], "acsf-fung", AdamHops(trials=10, hops=5), seed=0)[0]
match = align(cluster, result.atoms)  # best rotation/reflection/permutation
print(
    f"fingerprint RMSD {result.fingerprint_rmsd:.1e}, structure RMSD {match.rmsd:.4f} A "
    f"(mirror image: {match.reflected}), {result.seconds:.1f} s"
)
