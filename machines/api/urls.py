from django.urls import path

from dumont.core.routers import Router
from machines.api import views

router = Router()
router.register("provider-accounts", views.ProviderAccountViewSet, basename="provider-account")
router.register("ssh-keys", views.SSHKeyViewSet, basename="ssh-key")

urlpatterns = [
    path("offers", views.OfferListView.as_view(), name="offers"),
    path("machines/blacklist", views.BlacklistView.as_view(), name="machine-blacklist"),
    path("machines/history", views.MachineHistoryView.as_view(), name="machine-history"),
    *router.urls,
]
