"""The library releases the memory model was derived from and is held to (tests/, constraints.txt).

A plan carries them so a reader knows which code paths it describes: PEFT's adapter dtypes,
TRL's fused LM head, bitsandbytes' quantization constants and transformers' module trees all
change between releases. tests/test_versions.py keeps this table equal to constraints.txt.
"""

MODELLED_VERSIONS = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "trl": "1.16.0",
    "bitsandbytes": "0.50.2",
    "accelerate": "1.15.0",
}
