FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends restic openssh-client curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .
RUN DUMONT_ENV=development python manage.py collectstatic --no-input
RUN useradd --create-home dumont && mkdir -p /data && chown dumont /data
USER dumont
EXPOSE 8000
CMD ["gunicorn", "dumont.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "4"]
