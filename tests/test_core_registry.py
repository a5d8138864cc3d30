"""The registry (kdhooks/_registry.py): a kind is provided once, by one plugin, and only a Term subclass is one."""
import pytest

import kdhooks


def test_a_kind_registered_twice_is_refused():
    class First(kdhooks.Term):
        pass

    class Second(kdhooks.Term):
        pass

    registry = kdhooks.Registry()
    registry.current_plugin = "first"
    registry.add_term("same", First)
    registry.current_plugin = "second"
    with pytest.raises(kdhooks.ConfigError, match="provided twice: by 'first' and by 'second'"):
        registry.add_term("same", Second)
    assert Second.kind == "" and First.kind == "same"
    with pytest.raises(kdhooks.ConfigError, match="registered as 'same' and again as 'other'"):
        registry.add_term("other", First)
    with pytest.raises(TypeError, match="subclass of kdhooks.Term"):
        registry.add_term("base", kdhooks.Term)
