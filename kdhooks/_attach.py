"""What attaching does to the user's models and what closing undoes: kept separate, frozen, per-module modes."""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

from torch import nn

from ._errors import ConfigError

# teachers frozen by a live Distiller: [how many hold it, the undo that gives it back as the user gave it]
_FROZEN: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def training_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Each submodule's own train/eval mode (a frozen BatchNorm in eval inside a training model)."""
    return {module: module.training for module in model.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def freeze(module: nn.Module) -> Callable[[], None]:
    """Put ``module`` in eval mode with no parameter requiring grad; return what gives it back as it was.

    One teacher shared by several live Distillers (two students, one teacher) is given back when the last
    of them lets it go, with the modes and flags it had before the first took it, whatever the order of closing.
    """
    held = _FROZEN.get(module)
    if held is None:
        modes = training_modes(module)
        frozen = [p for p in module.parameters() if p.requires_grad]
        module.eval()
        for p in frozen:
            p.requires_grad_(False)

        def restore() -> None:
            for p in frozen:
                p.requires_grad_(True)
            restore_modes(modes)
        held = _FROZEN[module] = [0, restore]
    held[0] += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        held[0] -= 1
        if held[0] == 0:
            if _FROZEN.get(module) is held:
                del _FROZEN[module]
            held[1]()
    return release


def check_separate(role: str, module: nn.Module, others: Mapping[str, nn.Module], shared_allowed: bool) -> None:
    """A ConfigError if ``module`` is, or (a frozen teacher) shares a module or parameter with, one of ``others``.

    Trainable peers may share parts with the student (ONE's shared trunk); a teacher may not.
    """
    for other_role, other in others.items():
        if module is other:
            raise ConfigError(role, f"the {role} is the same module as the {other_role}", fix=
                              "pass a separate model (copy.deepcopy(model) for a born-again teacher); "
                              "self-distillation from one model needs no teacher (teacher=None)")
        if shared_allowed:
            continue
        theirs = {id(m): name for name, m in other.named_modules() if name}
        inside = theirs.get(id(module)) or next((n for n, m in module.named_modules() if n and m is other), None)
        if inside is not None:
            outer, inner = (other_role, role) if id(module) in theirs else (role, other_role)
            raise ConfigError(role, f"the {inner} is a submodule of the {outer} ({outer}.{inside}): the {outer}'s "
                              f"parameters, state_dict and optimizer would include the {inner}'s",
                              fix=f"keep the two models apart: remove {outer}.{inside} (hold the {inner} in a "
                              f"plain variable or a list, which nn.Module does not register)")
        for name, sub in module.named_modules():
            stateful = any(True for _ in sub.parameters()) or any(True for _ in sub.buffers())
            if name and id(sub) in theirs and stateful:
                raise ConfigError(role, f"the {role}'s {name!r} is the {other_role}'s "
                                  f"{theirs[id(sub)]!r}: a shared module would be frozen for the "
                                  f"{other_role} and its statistics (BatchNorm) updated by both",
                                  fix=f"give the {role} its own copy: {role}.{name} = "
                                  f"copy.deepcopy({other_role}.{theirs[id(sub)]})")
        params = {id(p): name for name, p in other.named_parameters()}
        for name, p in module.named_parameters():
            if id(p) in params:
                raise ConfigError(role, f"the {role}'s parameter {name!r} is the {other_role}'s "
                                  f"{params[id(p)]!r}: freezing the {role} would freeze it for the "
                                  f"{other_role}", fix=f"give the {role} its own copy of the parameter")
