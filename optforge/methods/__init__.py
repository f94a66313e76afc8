"""Registered method definitions, one small class per method, torchao style: each declares its parameters,
where it applies, what it saves and what precision it computes in, and imports torch only to apply itself.
The recipe schema is derived from these registries (optforge.recipe), so adding a method touches one file."""
