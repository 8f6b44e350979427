"""my_fp64: a third-party mcore plugin (the README's example). Registers, never imports torch."""

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry):
    registry.add("precision", "fp64", "my_fp64.recipe:FP64", summary="float64 everything")
