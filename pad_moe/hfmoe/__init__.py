"""PAD for trained Hugging Face MoE models: import (``experts``), ``padmoe compress`` (``compress``), the compact
export and its loader (``deployed``), and parameter counts from a config (``count``)."""
