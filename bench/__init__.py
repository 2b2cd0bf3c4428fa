"""qusec-bench: how much does a preprocessing defense really buy against adversarial examples?"""

__version__ = "0.1.0"
