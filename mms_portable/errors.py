"""The one error the portable code raises (MMS turns it into its own ModelLoadError)."""


class PortableModelError(ValueError):
    """A package cannot be built or loaded here: a model outside the built-in networks, arguments
    or a feature count a network cannot take, weights that differ from the recorded sha256."""
