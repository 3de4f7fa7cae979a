"""The ImageNet subsets of the paper's tables, as (wnid, ImageNet-1K index, name) tuples.

From the official repo's class files (docs/method.md §3.1). The index is DiT-XL/2's class condition;
the wnid is the folder name in an ImageNet train/val tree. Conditioning on a wrong index
silently ruins a run (docs/method.md §1.2), so the jobs take both from here, never from folder order.
"""

from __future__ import annotations

# misc/class_woof.txt: 10 dog breeds
IMAGEWOOF = (
    ("n02096294", 193, "Australian terrier"),
    ("n02093754", 182, "Border terrier"),
    ("n02111889", 258, "Samoyed"),
    ("n02088364", 162, "beagle"),
    ("n02086240", 155, "Shih-Tzu"),
    ("n02089973", 167, "English foxhound"),
    ("n02087394", 159, "Rhodesian ridgeback"),
    ("n02115641", 273, "dingo"),
    ("n02099601", 207, "golden retriever"),
    ("n02105641", 229, "Old English sheepdog"),
)

# misc/class_nette.txt: 10 easy classes
IMAGENETTE = (
    ("n01440764", 0, "tench"),
    ("n02102040", 217, "English springer"),
    ("n02979186", 482, "cassette player"),
    ("n03000684", 491, "chain saw"),
    ("n03028079", 497, "church"),
    ("n03394916", 566, "French horn"),
    ("n03417042", 569, "garbage truck"),
    ("n03425413", 571, "gas pump"),
    ("n03445777", 574, "golf ball"),
    ("n03888257", 701, "parachute"),
)

# the first 10 entries of IDC's ImageNet-100 list (misc/class100.txt, author in issue #19)
IMAGEIDC = (
    ("n02869837", 452, "bonnet"),
    ("n01749939", 64, "green mamba"),
    ("n02488291", 374, "langur"),
    ("n02107142", 236, "Doberman"),
    ("n13037406", 993, "gyromitra"),
    ("n02091831", 176, "Saluki"),
    ("n04517823", 882, "vacuum"),
    ("n04589890", 904, "window screen"),
    ("n03062245", 503, "cocktail shaker"),
    ("n01773797", 74, "garden spider"),
)

SUBSETS = {"imagewoof": IMAGEWOOF, "imagenette": IMAGENETTE, "imageidc": IMAGEIDC}


def class_lists(subset: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(wnids, ImageNet indices) of a subset, in the paper's label order, for DataConfig."""
    rows = SUBSETS[subset]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)
