"""Integration-test wiring: the AWS doubles (tests/fixtures/aws.py) as fixtures here."""

from tests.fixtures.aws import fake_imds, moto, moto_server

__all__ = ["fake_imds", "moto", "moto_server"]
