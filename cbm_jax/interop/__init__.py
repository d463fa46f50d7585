"""Importers of weights trained in other frameworks; torch is needed only to read a .pth file."""
