"""lungtf: leakage-safe lung histopathology classifiers on Keras 3 / TensorFlow, served by TF Serving."""

__version__ = "0.1.0"
