"""First-party plugins (import name `piaa_index_plugins`), registered through the same
`piaa_index` entry-point group a third-party plugin uses."""
