"""llmflash: run language models larger than memory by streaming FFN neurons from flash.

model = llmflash.FlashModel.open("out.llmflash")
print(model.generate("The capital of France is", max_new_tokens=16))
"""

from .errors import (
    BudgetError,
    ChatTemplateError,
    ConvertError,
    FlashIOError,
    InvalidArgumentError,
    LlmflashError,
    StoreError,
    UnsupportedModelError,
)

__version__ = "0.1.0"
__all__ = [
    "FlashModel",
    "LlmflashError",
    "StoreError",
    "ConvertError",
    "UnsupportedModelError",
    "FlashIOError",
    "BudgetError",
    "InvalidArgumentError",
    "ChatTemplateError",
    "verify_store",
    "__version__",
]


def __getattr__(name: str):
    # Import the model API lazily: `import llmflash` stays cheap for the CLI's argument parsing.
    if name == "FlashModel":
        from .api import FlashModel

        return FlashModel
    if name == "verify_store":
        from .verify import verify_store

        return verify_store
    raise AttributeError(name)
