"""The Responses API (``/v1/responses``): ``request`` makes a task of the request,
``translate`` reads the task's log as the API's stream events and output, ``routes`` serves
them."""
