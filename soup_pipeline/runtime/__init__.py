"""Process-level helpers every layer may use: errors, atomic files, locks, devices, randomness, memory meters,
kill points. They import nothing else from the package."""
