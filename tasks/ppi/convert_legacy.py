"""Convert a PPI ``(data, slices)`` file from any torch-geometric version to plain tensors.

Run it where the file CAN be unpickled (the environment with the torch-geometric that wrote
it, e.g. Hu et al.'s torch-geometric 1.0.3 / Python 3.6):

    python convert_legacy.py geometric_data_processed.pt ppi_plain.pt

It needs only torch (no import from this repository) and writes
``{"format": "ppi-plain-v1", "data": {name: tensor}, "slices": {name: tensor}}``, which
``tasks.ppi.data.load_ppi`` reads with any torch-geometric. Only convert files you trust
(unpickling runs code).
"""

import sys

import torch


def plain_tensors(data):
    """Tensor attributes of a collated Data (old: in __dict__; new: via to_dict())."""
    if isinstance(data, dict):
        items = data.items()
    elif hasattr(data, "__dict__") and "_store" in data.__dict__:
        items = data.to_dict().items()
    else:
        items = vars(data).items()
    return {str(k): v for k, v in items if torch.is_tensor(v)}


def convert(src, dst):
    """Read ``src`` (an InMemoryDataset (data, slices) file), write the plain format to ``dst``."""
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except TypeError:  # torch < 1.13 has no weights_only
        obj = torch.load(src, map_location="cpu")
    data, slices = obj[0], obj[1]
    out = {
        "format": "ppi-plain-v1",
        "data": plain_tensors(data),
        "slices": {str(k): v for k, v in dict(slices).items()},
    }
    torch.save(out, dst)
    return sorted(out["data"])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python convert_legacy.py IN.pt OUT.pt")
        sys.exit(2)
    print("wrote", sys.argv[2], "with fields", convert(sys.argv[1], sys.argv[2]))
