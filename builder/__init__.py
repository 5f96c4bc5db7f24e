"""meshbake: bake Consul service-mesh golden VM images from one YAML spec."""

__version__ = "0.1.0"
