"""What every benchmark shares: the machine it ran on (``device``), how it times and measures
memory (``timing``), where its results go and what they start with (``paths``, ``output``), and
the options it takes the same way (``cli``)."""
