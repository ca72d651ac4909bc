"""User-facing errors: one clear sentence, shown without a traceback by the CLI."""


class TightropeError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class MissingResourceError(TightropeError):
    """A model, dataset or linguistic resource that is not installed here."""
