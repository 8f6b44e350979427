"""Single source of the mcore-core version and the plugin API versions it accepts."""

__version__ = "0.1.1"

#: The plugin API this core implements. A plugin module declares the API it was built
#: for as ``MCORE_PLUGIN_API = <int>``; the registry loads it only if that number is in
#: ``SUPPORTED_PLUGIN_APIS``.
PLUGIN_API_VERSION = 1
SUPPORTED_PLUGIN_APIS: tuple[int, ...] = (1,)
