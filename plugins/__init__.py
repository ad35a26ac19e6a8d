"""First-party plugins (import name `piaa_index_plugins`), written like a third-party plugin
and registered in code by the plugin manager (`piaa_index.plugins.DEFAULT_PLUGINS`)."""
