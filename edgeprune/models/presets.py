"""Named presets: every model row of the tgGBC paper's Table 1, plus the published
speed-test settings. The backbone name fixes the key count for decoder-only work; a
whole-model export needs a backbone we implement (ResNet-18/50)."""
from __future__ import annotations

from edgeprune.errors import ModelNotFoundError
from edgeprune.models.config import DecoderConfig, ModelPreset

_PETR = DecoderConfig()
# StreamPETR: 644 pre-defined + 256 propagated queries, 1024 temporal memory tokens.
_STREAM = DecoderConfig(num_queries=644, num_propagated=256, memory_len=1024)
# Lighter speed-test setting of StreamPETR (300 + 128 queries, memory 512).
_STREAM_LIGHT = DecoderConfig(num_queries=300, num_propagated=128, memory_len=512)

# The demo detector (edgeprune train-demo): the synthetic dataset's 4 classes, 300 queries, 1056 keys
# (6 x 22 x 8 at 352x128); FFN 512 wide so that the fp16 checkpoint stays under 20 MB.
_DEMO = DecoderConfig(num_classes=4, num_queries=300, ffn_dims=512, query_content="position")

_ROWS: list[ModelPreset] = [
    ModelPreset("petr-r50-1408x512", "petr", "resnet50", (1408, 512), decoder=_PETR),
    ModelPreset("petr-vov-1600x640", "petr", "vovnet", (1600, 640), decoder=_PETR),
    ModelPreset("petr-r50-800x320", "petr", "resnet50", (800, 320), decoder=_PETR,
                description="GPQ paper speed setting"),
    ModelPreset("focalpetr-r18-1408x512", "focalpetr", "resnet18", (1408, 512), decoder=_PETR),
    ModelPreset("focalpetr-vov-800x320", "focalpetr", "vovnet", (800, 320), decoder=_PETR),
    ModelPreset("focalpetr-r18-704x256", "focalpetr", "resnet18", (704, 256), decoder=_PETR,
                description="GPQ paper speed setting"),
    ModelPreset("streampetr-r50-704x256", "streampetr", "resnet50", (704, 256), decoder=_STREAM),
    ModelPreset("streampetr-vov-1600x640", "streampetr", "vovnet", (1600, 640), decoder=_STREAM),
    ModelPreset("streampetr-r50-704x256-light", "streampetr", "resnet50", (704, 256),
                decoder=_STREAM_LIGHT, description="speed-test setting: 300+128 queries, memory 512"),
    ModelPreset("3dppe-vov-800x320", "3dppe", "vovnet", (800, 320), decoder=_PETR),
    ModelPreset("mbev-vov-800x320", "mbev", "vovnet", (800, 320), decoder=_PETR),
    ModelPreset("open-r50-704x256", "open", "resnet50", (704, 256), decoder=_PETR),
    ModelPreset("open-vov-800x320", "open", "vovnet", (800, 320), decoder=_PETR),
    ModelPreset("open-r101-1408x512", "open", "resnet101", (1408, 512), decoder=_PETR),
    ModelPreset("toc3d-vov-1600x800", "streampetr", "vovnet", (1600, 800), decoder=_STREAM,
                description="ToC3D comparison setting (30000 keys)"),
    ModelPreset("demo", "petr", "resnet-tiny", (352, 128), decoder=_DEMO, neck_kernel=1, weights="demo.pt",
                description="trained by edgeprune train-demo on dataset synth scenes (56 min on 2 CPU cores; "
                            "mAP 0.51 on a held-out split); --checkpoint loads other train-demo weights"),
]

PRESETS: dict[str, ModelPreset] = {p.name: p for p in _ROWS}


def get_preset(name: str) -> ModelPreset:
    """Look up a preset by name, failing with the list of known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model preset {name!r}; available: {', '.join(PRESETS)} "
            "(see: edgeprune export --list-models)"
        ) from None


def list_presets() -> list[ModelPreset]:
    return list(PRESETS.values())
