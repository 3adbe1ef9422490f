"""srt-serve's web service: retrieval indexes, their neighbours and SRT feature pictures over HTTP.

    catalog   the indexes served and their stores: searches, thumbnails, pictures, summaries
    batching  one thread per kind of work, taking every waiting request in one call
    app       the FastAPI routes (OpenAPI docs at /docs) and the page, served from static/

May import: every package of the pipeline, FastAPI; nothing imports it but `commands.serve`.
"""
