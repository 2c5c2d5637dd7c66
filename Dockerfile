# One image for the Locust master, its workers and the CDC consumer (see
# docker-compose.yml); each service picks its program with its command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A regular install, not an editable one, from a copy that is then removed: the
# code exists once, in site-packages. No dev extras: the image runs loads, not
# the test suite. It puts `cdc-load` and `locust` on the PATH.
COPY pyproject.toml /src/
COPY services /src/services
COPY cdc_users /src/cdc_users
RUN pip install /src && rm -rf /src

# Locust takes the locustfile and the profiles by relative path, from here.
WORKDIR /app
COPY locustfile.py ./
COPY configs ./configs
RUN useradd --system --create-home --uid 10001 cdcload \
    && mkdir reports \
    && chown cdcload reports
USER cdcload

EXPOSE 8089 5557
# Alone, the image validates the default profile and prints it resolved.
CMD ["cdc-load", "check-config"]
