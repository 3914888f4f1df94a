"""The version of torchkeep, written into every manifest it saves."""

__version__ = "0.1.0"
