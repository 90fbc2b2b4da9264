"""acol-flow: weakly supervised object localization (ACoL, co-attention) at cluster scale."""

__version__ = "0.1.0"
