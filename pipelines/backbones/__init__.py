"""Backbone adapters: one thin adapter per video model behind the single denoiser contract. The registry is
`registry.py` (`load_backbone`, `get`, `register`); this package file stays empty so that importing one module of the
package loads no other."""
