"""Model layer: DiT, VAEs, text encoder, loading and quantisation.

diffusers imports torchao whenever it is installed (it is, for ``--quantize``), and with torch 2.14.1,
diffusers 0.42.1 and torchao 0.18.0 that import logs two notices that concern neither us nor the user
(a torch deprecation of torchao's Enum registration, and diffusers' loader for torchao-*serialised* checkpoints,
which we never read). They are filtered here, once, by their exact text; every other record passes.
"""

import logging


class _ImportNoise(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


logging.getLogger("torch.utils._pytree").addFilter(_ImportNoise("is an Enum subclass and is now natively supported"))
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    _ImportNoise("Unable to import `torchao` Tensor objects"))
