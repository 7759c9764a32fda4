"""stdout and stderr as Rich consoles, made on first use: Rich costs a noticeable part of start-up, and a
ProxyCommand to a running instance prints nothing at all."""

from __future__ import annotations

from typing import Any


class LazyConsole:
    def __init__(self, **options: Any):
        self._options = options
        self._console = None

    @property
    def real(self):
        """The Console itself (what Rich's Live and status need)."""
        if self._console is None:
            from rich.console import Console

            # soft_wrap: a long line (an ssh command, an event) stays one line, for copy-paste and for logs
            self._console = Console(highlight=False, soft_wrap=True, **self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


out = LazyConsole()
err = LazyConsole(stderr=True)
