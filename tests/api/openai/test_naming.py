"""Fine-tuned model names (api/routers/openai/naming.py): built and parsed in one place."""
from __future__ import annotations

from types import SimpleNamespace

from api.routers.openai.naming import adapter_id_from_model, fine_tuned_model_name


def test_a_fine_tune_is_named_after_its_base_suffix_and_adapter_id_and_parses_back():
    art = SimpleNamespace(id=7, base_model="/models/tiny-llama", spec={"suffix": "ag news"})
    name = fine_tuned_model_name(art)
    assert name == "ft:tiny-llama:newslora:ag-news:7" and adapter_id_from_model(name) == 7
    assert fine_tuned_model_name(SimpleNamespace(id=3, base_model="smollm2-135m", spec={})) == \
        "ft:smollm2-135m:newslora::3"
    assert fine_tuned_model_name(art, suffix="x") == "ft:tiny-llama:newslora:x:7"
    for other in ("smollm2-135m", "ft:a:b:c", "ft:a:newslora:s:07", "ft:a:newslora:s:x"):
        assert adapter_id_from_model(other) is None
