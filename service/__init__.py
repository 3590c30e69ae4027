"""The Medical Aegis defence service: HTTP in front of a model bundle (Cushion -> classifier -> Shield), no torch.

`service.main.create_app(settings)` builds the FastAPI app; `python -m service` serves it with uvicorn.
"""
