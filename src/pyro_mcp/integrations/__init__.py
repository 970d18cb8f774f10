"""Thin adapters that expose the tool contract to model frameworks.

Each module turns :data:`pyro_mcp.contract.TOOLS` into one framework's tool
type; none restates a schema. Their packages are the ``integrations`` extra
(``pip install 'pyro-mcp[integrations]'``) and are imported only by the module
that needs them:

* :mod:`pyro_mcp.integrations.openai_responses`: function tools for the OpenAI
  Responses API (strict mode) and a handler for the model's function calls.
* :mod:`pyro_mcp.integrations.langchain`: LangChain ``StructuredTool`` objects.
* :mod:`pyro_mcp.integrations.pydantic_ai`: PydanticAI ``Tool`` objects.

The recommended tool for every framework is ``vm_run`` (the default profile of
these adapters is ``vm-run``).
"""
