"""Built-in plugins. Each module is a pluggy plugin loaded exactly like a third-party one."""
